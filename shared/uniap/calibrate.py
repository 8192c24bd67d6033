"""Fit the cost model to measured training iterations (`uniap calibrate`, the profilers' calibration runs): it
prices plans, so it sits above the planner, not among the profile readers.

Each measurement is a plan that really ran and what its iterations took: time per iteration and, when the
log reports it, the peak memory. Two coefficients are fitted (uniap.profile.schema.Calibration):
- compute_scale: for each run, the factor on every layer's compute time that makes the predicted time per
  iteration equal the measured one (solved by bisection: the prediction grows with it); the fit is the
  median over runs, robust to one odd log;
- reserved_per_allocated: for each run, the measured peak reserved memory over the predicted allocated
  peak of the fullest stage; the fit is the largest over runs, so no measured run is predicted to need
  less than it did. A log with only allocated peaks scales the default fragmentation allowance by the
  measured-over-predicted allocation instead.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from .cost.model import DEFAULT_RESERVED_PER_ALLOCATED
from .errors import ProfileError
from .plan import Plan
from .planner import configure, price
from .cluster.devices import gpu_family
from .cluster.spec import ClusterSpec
from .model.spec import ModelSpec, TrainingSpec
from .profile.harness import Iterations, RunSchedule
from .profile.schema import Calibration, CalibrationRun, Profile

log = logging.getLogger("uniap.calibrate")

SCALE_RANGE = (0.2, 5.0)  # the compute scales a fit may reach (Calibration's validity range)
BISECTION_STEPS = 60


@dataclass(frozen=True)
class Measurement:
    """What one run of `plan` measured: seconds per iteration and peak bytes (None where not logged)."""

    label: str
    plan: Plan
    time_per_iteration_s: float
    peak_reserved_bytes: float | None = None
    peak_allocated_bytes: float | None = None


@dataclass(frozen=True)
class TrainingRun:
    """One whole-model run a profiler or benchmark made: the plan of its configuration (and the framework
    config it ran, where there is one), the optimizer, the loss of every iteration (mean over its
    micro-batches, warm-up included), the timed iterations' seconds and the time per iteration (their median;
    over ranks the slowest), peak bytes over the timed iterations (GPU only) above what the device held when
    the run began (`memory_before_bytes`: tensors earlier work in the process left alive, which the peak
    would otherwise count), and the optimizer steps an fp16 loss scaler skipped while timing."""

    plan: Plan
    optimizer: str
    losses: tuple[float, ...]
    iteration_times_s: tuple[float, ...]
    time_per_iteration_s: float
    peak_reserved_bytes: float | None = None
    peak_allocated_bytes: float | None = None
    skipped_steps: int = 0
    config: dict | None = None
    memory_before_bytes: float | None = None

    @classmethod
    def measured(
        cls,
        plan: Plan,
        optimizer: str,
        measured: Iterations,
        config: dict | None = None,
        slowest: Callable[[float], float] = float,
    ) -> TrainingRun:
        """The run whose iterations `measured` holds; `slowest` turns one rank's time and peaks into the
        largest over the ranks (every rank must call it then)."""
        reserved, allocated = measured.peak_reserved_bytes, measured.peak_allocated_bytes
        return cls(
            plan=plan,
            optimizer=optimizer,
            losses=measured.losses,
            iteration_times_s=measured.seconds,
            time_per_iteration_s=slowest(statistics.median(measured.seconds)),
            peak_reserved_bytes=None if reserved is None else slowest(reserved),
            peak_allocated_bytes=None if allocated is None else slowest(allocated),
            skipped_steps=measured.skipped_steps,
            config=config,
            memory_before_bytes=measured.memory_before_bytes,
        )

    def measurement(self, label: str) -> Measurement:
        return Measurement(
            label=label,
            plan=self.plan,
            time_per_iteration_s=self.time_per_iteration_s,
            peak_reserved_bytes=self.peak_reserved_bytes,
            peak_allocated_bytes=self.peak_allocated_bytes,
        )


def run_plan(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    cluster: ClusterSpec,
    target: str,
    schedule: RunSchedule,
    replicas: int = 1,
    recompute: str = "none",
) -> Plan:
    """The plan a profiler's calibration run is priced with, for any framework: TP 1, PP 1, ZeRO 0, `replicas`
    data-parallel replicas (one per rank) each training `schedule`'s micro-batches, every transformer layer
    with `recompute`."""
    mbs = schedule.micro_batch_size
    job = replace(training, global_batch_size=mbs * schedule.micro_batches * replicas)
    return configure(model, cluster, job, target=target, micro_batch_size=mbs, recompute=recompute, profile=profile)[0]


@dataclass(frozen=True)
class Fit:
    """The fitted profile and, per run, predicted vs measured before and after the fit."""

    profile: Profile
    runs: tuple[CalibrationRun, ...]


def _uncalibrated(profile: Profile | None, device: str, runtime: str) -> Profile:
    if profile is None:
        return Profile(device=device, runtime=runtime, notes="calibration only; layer times estimated")
    return replace(profile, calibration=None)


def _with(profile: Profile, calibration: Calibration) -> Profile:
    return replace(profile, calibration=calibration)


def _time_at(m: Measurement, base: Profile, scale: float) -> float:
    return price(m.plan, _with(base, Calibration(compute_scale=scale))).prediction.time_per_iteration


def _scale_for(m: Measurement, base: Profile) -> float:
    """The compute scale at which the plan's predicted time equals the measured one (bisection in log space)."""
    lo, hi = SCALE_RANGE
    if _time_at(m, base, hi) < m.time_per_iteration_s or _time_at(m, base, lo) > m.time_per_iteration_s:
        raise ProfileError(
            f"{m.label}: the measured {m.time_per_iteration_s:.4g} s per iteration is outside what "
            f"compute {lo:g}x to {hi:g}x as slow as predicted can explain",
            "check that the plan is the configuration that produced the log",
        )
    for _ in range(BISECTION_STEPS):
        mid = math.sqrt(lo * hi)
        if _time_at(m, base, mid) < m.time_per_iteration_s:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _allocated_peak(m: Measurement, profile: Profile) -> float:
    pred = price(m.plan, profile).prediction
    return max(stage.allocated_peak for stage in pred.stage_breakdown)


def _check_same_gpus(measurements: list[Measurement], profile: Profile | None) -> None:
    """A calibration fits one GPU model: the runs' GPUs and the profile's must be of one family (an A100
    profile fitted to H100 runs would be wrong on both)."""
    families = {m.label: gpu_family(m.plan.cluster.gpu_name) for m in measurements}
    if profile is not None:
        families[f"profile ({profile.device})"] = gpu_family(profile.device)
    known = {family for family in families.values() if family is not None}
    if len(known) > 1:
        listed = ", ".join(f"{what}: {family}" for what, family in families.items() if family)
        raise ProfileError(
            f"the runs and the profile are of different GPUs ({listed}); a calibration fits one GPU model",
            "calibrate each GPU model with its own runs and profile",
        )


def fit(measurements: list[Measurement], profile: Profile | None = None, source: str = "") -> Fit:
    """A profile (the given one's measurements plus a fresh calibration) fitted to the measurements."""
    if not measurements:
        raise ProfileError("nothing to calibrate: no measured run was given")
    first = measurements[0].plan
    _check_same_gpus(measurements, profile)
    base = _uncalibrated(profile, first.cluster.gpu_name, f"calibrated for target {first.target}")
    scale = statistics.median(_scale_for(m, base) for m in measurements)
    ratios = []
    for m in measurements:
        allocated = _allocated_peak(m, base)
        if m.peak_reserved_bytes is not None:
            ratios.append(m.peak_reserved_bytes / allocated)
        elif m.peak_allocated_bytes is not None:
            ratios.append(m.peak_allocated_bytes / allocated * DEFAULT_RESERVED_PER_ALLOCATED)
    reserved = max(ratios) if ratios else None
    fitted = Calibration(compute_scale=scale, reserved_per_allocated=reserved, source=source)
    runs = []
    for m in measurements:
        before, after = price(m.plan, base).prediction, price(m.plan, _with(base, fitted)).prediction
        measured_peak = m.peak_reserved_bytes if m.peak_reserved_bytes is not None else m.peak_allocated_bytes
        kind = "reserved" if m.peak_reserved_bytes is not None else "allocated"
        peak_of = (
            (lambda p: max(p.stage_memory))
            if kind == "reserved"
            else (lambda p: max(s.allocated_peak for s in p.stage_breakdown))
        )
        runs.append(
            CalibrationRun(
                label=m.label,
                job=_job_summary(m.plan),
                measured_time_s=m.time_per_iteration_s,
                predicted_time_s=before.time_per_iteration,
                fitted_time_s=after.time_per_iteration,
                measured_peak_bytes=measured_peak,
                predicted_peak_bytes=peak_of(before) if measured_peak else None,
                fitted_peak_bytes=peak_of(after) if measured_peak else None,
                memory_kind=kind,
            )
        )
    runs = tuple(runs)
    return Fit(profile=_with(base, replace(fitted, runs=runs)), runs=runs)


def report_lines(calibration: Calibration, what: str, skipped_steps: int = 0) -> list[str]:
    """What a profiler prints about its calibration run: measured vs predicted, the fitted coefficients."""
    run = calibration.runs[0]
    lines = [
        f"calibration {what}: {run.measured_time_s * 1e3:.3f} ms/iteration measured, "
        f"{run.predicted_time_s * 1e3:.3f} ms predicted; compute scale {calibration.compute_scale:.4f}"
        + (
            f", reserved/allocated {calibration.reserved_per_allocated:.4f}"
            if calibration.reserved_per_allocated
            else ""
        )
    ]
    if skipped_steps:
        lines.append(f"calibration: the fp16 loss scaler skipped {skipped_steps} timed step(s)")
    return lines


def _job_summary(plan: Plan) -> dict:
    """What ran, in the plan's own terms (enough to recognise it, not to rebuild it)."""
    strategy = plan.uniform_strategy or plan.layers[0].strategy
    return {
        "target": plan.target,
        "model": plan.model.name,
        "cluster": plan.cluster.name,
        "gpus": plan.cluster.num_nodes * plan.cluster.gpus_per_node,
        "global_batch_size": plan.training.global_batch_size,
        "seq_length": plan.training.seq_length,
        "pipeline_degree": plan.pipeline_degree,
        "micro_batches": plan.micro_batches,
        "strategy": strategy.label,
    }


def fit_run(measurement: Measurement, profile: Profile, source: str) -> tuple[Profile, str | None]:
    """The profile fitted to one run; where only the memory ratio falls outside the Calibration's range, the
    time alone, and why memory is not fitted. ProfileError when the time cannot be fitted."""
    try:
        return fit([measurement], profile, source=source).profile, None
    except ProfileError as exc:
        if measurement.peak_reserved_bytes is None and measurement.peak_allocated_bytes is None:
            raise
        timed = replace(measurement, peak_reserved_bytes=None, peak_allocated_bytes=None)
        return fit([timed], profile, source=source).profile, f"memory not fitted ({exc.message})"


def _noted(profile: Profile, *notes: str | None) -> Profile:
    return replace(profile, notes="; ".join(n for n in (profile.notes, *notes) if n))


@dataclass(frozen=True)
class RunDescription:
    """How a profiler names its calibration run: `label` (the measurement's), `what` ran (for the report),
    `source` (the Calibration's), `note` (the profile's note on what ran and how; `{optimizer}` in it becomes
    the run's optimizer)."""

    label: str
    what: str
    source: str
    note: str


def calibrated(
    profile: Profile,
    run: TrainingRun | None,
    problem: str | None,
    described: RunDescription,
    report: list[str],
    rank_zero: bool = True,
) -> Profile:
    """What a profiler's calibration ends with, for any framework: `profile` fitted to `run`
    on `rank_zero` (the other ranks keep it as it is), the report lines in `report` and the note on what
    ran; where the run could not be made (`problem`) or fitted, the profile uncalibrated, with a warning
    and the reason in its notes, its layer timings kept."""
    if run is not None and rank_zero:
        try:
            fitted, memory_problem = fit_run(run.measurement(described.label), profile, described.source)
        except ProfileError as exc:
            problem = f"not calibrated: {exc.message}"
        else:
            report += report_lines(fitted.calibration, described.what, run.skipped_steps)
            if memory_problem:
                report.append(f"calibration: {memory_problem}")
            note = described.note.format(optimizer=run.optimizer)
            profile = _noted(fitted, note, memory_problem and f"calibration {memory_problem}")
    if problem is not None:
        if rank_zero:
            log.warning("%s", problem)
        profile = _noted(profile, problem)
    return profile
