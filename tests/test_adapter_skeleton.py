"""The pieces both adapters' profilers are written against (uniap.profile.harness, uniap.profile.runner,
uniap.calibrate): what they do on their own, without a framework."""

from __future__ import annotations

import logging

import pytest

from uniap.calibrate import RunDescription, TrainingRun, calibrated, run_plan
from uniap.cluster.spec import cluster_preset
from uniap.errors import SpecError
from uniap.model.presets import model_preset
from uniap.model.spec import TrainingSpec
from uniap.profile import Profile
from uniap.profile.harness import Device, Iterations, RunSchedule, time_iterations, unless_out_of_memory

torch = pytest.importorskip("torch")

CPU = Device("cpu", "cpu", lambda: None)


def test_a_run_schedule_refuses_what_cannot_run():
    with pytest.raises(SpecError, match="must be >= 1"):
        RunSchedule(micro_batch_size=1, micro_batches=0, warmup=1, iterations=3)
    with pytest.raises(SpecError, match="warm-up >= 0"):
        RunSchedule(micro_batch_size=1, micro_batches=1, warmup=-1, iterations=3)
    assert str(RunSchedule(2, 4, 0, 3)) == "micro-batch 2 x 4, 3 iterations after 1 warmup"


def test_time_iterations_times_after_the_warmup_and_counts_skipped_steps():
    calls = []

    def iteration():
        calls.append(len(calls))
        return float(len(calls)), len(calls) != 3  # the third iteration's step is skipped

    measured = time_iterations(iteration, RunSchedule(1, 1, warmup=0, iterations=4), CPU)
    assert len(calls) == 5  # max(warmup, 1) untimed + 4 timed
    assert measured.losses == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert len(measured.seconds) == 4 and measured.skipped_steps == 1
    assert measured.peak_reserved_bytes is None and measured.memory_before_bytes is None  # no CUDA


def test_out_of_memory_on_any_rank_is_agreed_and_cleaned_up():
    cleaned = []

    def oom():
        raise torch.OutOfMemoryError("out of memory")

    assert unless_out_of_memory(oom, lambda ok: ok, lambda: cleaned.append(1)) is None
    assert unless_out_of_memory(lambda: 7, lambda ok: ok, lambda: cleaned.append(1)) == 7
    assert unless_out_of_memory(lambda: 7, lambda ok: False) is None  # another rank ran out
    assert cleaned == [1, 1]
    with pytest.raises(ValueError):  # anything else is not a measurement to skip
        unless_out_of_memory(lambda: int("x"), lambda ok: ok)


def _run(seconds: float) -> TrainingRun:
    model = model_preset("gpt3-1.3b")
    plan = run_plan(
        model,
        TrainingSpec(global_batch_size=1, seq_length=512),
        None,
        cluster_preset("dgx-h100").with_shape(1, 1),
        "megatron",
        RunSchedule(1, 2, 1, 3),
    )
    return TrainingRun.measured(plan, "Adam", Iterations((1.0,) * 4, (seconds,) * 3, 0))


def test_calibrated_fits_a_run_and_notes_a_problem(caplog):
    described = RunDescription("test run", "a test run", "test", "calibration: a test run ({optimizer})")
    run = _run(_run(1.0).plan.time_per_iteration * 1.3)
    report: list[str] = []
    fitted = calibrated(Profile(device="H100", runtime="test"), run, None, described, report)
    assert fitted.calibration.compute_scale > 1.0 and "calibration: a test run (Adam)" in fitted.notes
    assert report and report[0].startswith("calibration a test run")
    with caplog.at_level(logging.WARNING):
        kept = calibrated(Profile(device="H100", runtime="test"), None, "not calibrated: why", described, [])
    assert kept.calibration is None and kept.notes.endswith("not calibrated: why")
    assert "not calibrated: why" in caplog.text
    other_rank = calibrated(Profile(device="H100", runtime="test"), run, None, described, [], rank_zero=False)
    assert other_rank.calibration is None  # only rank 0 fits
