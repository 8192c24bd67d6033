"""Planning a Megatron-LM job from its command line: the model, batch and pins read from the script's
arguments, Megatron's own limits checked, the core planner run; and a saved plan checked against the job
it is launched for.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from uniap.errors import SpecError, UniapError
from uniap.plan import Plan

from . import flags as F
from .args import ParsedJob, job_from_args, megatron_launch
from .capability import (
    CONNECTIONS_ENV,
    FSDP_CONNECTIONS,
    FSDP_ZERO,
    MEGATRON,
    TP_CONNECTIONS,
    connections_suffice,
    megatron_capability,
)
from .merge import explicit_settings, strip_auto_parallel

if TYPE_CHECKING:  # the planner (cvxpy, SCIP) is imported only when planning
    from uniap.planner import Job

DEFAULT_CLUSTER = "dgx-a100-80g"
# plan_megatron's `connections` when any value works: the launcher sets what the plan needs, or the GPU is a
# Blackwell or newer, where Megatron-LM has no rule on it.
ANY_CONNECTIONS = "any"
# How Megatron-LM spells the pins the core checks (uniap.planner.check_pins names them in its refusals).
PIN_FLAGS = {
    "tp": F.TENSOR_PARALLEL.spelling,
    "cp": F.CONTEXT_PARALLEL.spelling,
    "virtual_stages": F.VIRTUAL_STAGES_PER_RANK.spelling,
    "pipeline_degree": F.PIPELINE_PARALLEL.spelling,
    "micro_batch_per_replica": F.MICRO_BATCH_SIZE.spelling,
    "offloaded_layers": F.CPU_OFFLOADING_LAYERS.spelling,
}


def plan_megatron(
    argv: list[str],
    nodes: int,
    gpus_per_node: int,
    cluster: str = DEFAULT_CLUSTER,
    profile: str | None = None,
    time_limit: float | None = None,
    progress: bool | None = False,
    connections: str | None = ANY_CONNECTIONS,
) -> Plan:
    """Plan the Megatron job `argv` on `nodes` x `gpus_per_node` GPUs of `cluster`, its explicit parallel
    flags pinned. `connections` is the CUDA_DEVICE_MAX_CONNECTIONS the ranks run with before Blackwell (None:
    unset); ANY_CONNECTIONS when the launch sets what the plan needs or the GPU has no such rule. Raises
    SpecError / InfeasibleError / SolverTimeLimitError with the planner's message."""
    # The solver (cvxpy, SCIP) is imported only when planning: printing and launching stay fast.
    from uniap.cluster.spec import load_cluster
    from uniap.planner import DEFAULT_GAP, Job, check_search_limits
    from uniap.planner import plan as solve
    from uniap.profile.schema import Profile

    check_search_limits(time_limit, DEFAULT_GAP)
    argv = strip_auto_parallel(argv)
    job = job_from_args(argv)
    if explicit_settings(argv).get(F.TORCH_FSDP2.dest):
        # --use-torch-fsdp2 requires one pipeline stage whatever the data-parallel size (validate_args).
        if job.pins.pipeline_degree not in (None, 1):
            raise SpecError(
                f"--use-torch-fsdp2 requires --pipeline-model-parallel-size 1 (Megatron validate_args); "
                f"got {job.pins.pipeline_degree}",
                "drop one of the two flags",
            )
        job = replace(job, pins=replace(job.pins, pipeline_degree=1))
    cl = load_cluster(cluster, nodes, gpus_per_node)
    training = job.training
    check_megatron_pins(job)
    base = Job(
        model=job.model,
        cluster=cl,
        training=training,
        target=MEGATRON.name,
        pins=job.pins,
        profile=Profile.load(profile) if profile else None,
        pin_flags=PIN_FLAGS,
        capability=megatron_capability(training.optimizer, connections_allow_fsdp=True),
    )
    plans, errors = [], []
    for candidate in jobs_for_connections(base, connections):
        try:
            found = solve(candidate, time_limit=time_limit, progress=progress)[0]
        except UniapError as exc:  # this half of the space has no plan; the other may
            errors.append(exc)
            continue
        if runs_with(found, connections):  # e.g. not TP over all GPUs, where ZeRO-3 has no replicas to shard
            plans.append(found)
    if not plans:
        every = "every plan that fits this job uses tensor or context parallelism without FSDP, which"
        raise errors[0] if errors else _connections_error(connections, every, "needs it to be 1", TP_CONNECTIONS)
    plan = min(plans, key=lambda p: p.time_per_iteration)
    megatron_launch(plan)  # a plan for target megatron is always runnable; fail here if not
    return plan


def jobs_for_connections(job: Job, connections: str | None) -> list[Job]:
    """The job as the ranks' CUDA_DEVICE_MAX_CONNECTIONS allows it. "1": no FSDP. Another value or unset:
    TP > 1 or CP > 1 only with FSDP, so two searches, TP 1 and CP 1, and FSDP (ZeRO-3 at PP 1), of which the
    better plan wins. SpecError naming the variable and both remedies when the user's own pins rule out both."""
    if connections == ANY_CONNECTIONS:
        return [job]
    if connections == TP_CONNECTIONS:
        if job.pins.zero == FSDP_ZERO:
            raise _connections_error(
                connections,
                f"{F.MEGATRON_FSDP.spelling} / {F.TORCH_FSDP2.spelling}",
                "needs it other than 1",
                FSDP_CONNECTIONS,
            )
        return [replace(job, capability=megatron_capability(job.training.optimizer, connections_allow_fsdp=False))]
    p, jobs = job.pins, []
    if p.tp in (None, 1) and p.cp in (None, 1):
        jobs.append(replace(job, pins=replace(p, tp=1, cp=1)))
    if p.zero in (None, FSDP_ZERO) and p.pipeline_degree in (None, 1):
        jobs.append(replace(job, pins=replace(p, zero=FSDP_ZERO, pipeline_degree=1)))
    if not jobs:
        pinned = [f"{flag.spelling} {v}" for flag, v in ((F.TENSOR_PARALLEL, p.tp), (F.CONTEXT_PARALLEL, p.cp)) if v]
        raise _connections_error(
            connections, f"{' and '.join(pinned)} without FSDP", "needs it to be 1", TP_CONNECTIONS
        )
    return jobs


def runs_with(plan: Plan, connections: str | None) -> bool:
    """Whether Megatron-LM accepts `plan` with the ranks' CUDA_DEVICE_MAX_CONNECTIONS (see jobs_for_connections)."""
    if connections == ANY_CONNECTIONS:
        return True
    return connections_suffice(megatron_launch(plan).env.get(CONNECTIONS_ENV), connections)


def _connections_error(value: str | None, what: str, rule: str, wanted: str) -> SpecError:
    have = "unset" if value is None else f"{value!r}"
    return SpecError(
        f"{what} {rule} before Blackwell GPUs, but {CONNECTIONS_ENV} is {have} in this launch "
        "(Megatron-LM validate_args asserts it)",
        f"export {CONNECTIONS_ENV}={wanted} before launching, or drop the flag and let the plan fit the "
        f"variable, or launch with `uniap-megatron run`, which sets it as the plan needs",
    )


def check_megatron_pins(job: ParsedJob) -> None:
    """Megatron's own limit beyond the core's pin rules: no more pipeline stages than transformer layers."""
    p = job.pins
    if p.pipeline_degree is not None and p.pipeline_degree > job.model.num_layers:
        raise SpecError(
            f"--pipeline-model-parallel-size {p.pipeline_degree} exceeds --num-layers {job.model.num_layers}",
            "drop the flag to let the planner choose, or change it",
        )


def check_plan_fits(plan: Plan, argv: list[str], nodes: int, gpus_per_node: int, source: str = "the plan") -> ParsedJob:
    """Refuse a saved plan made for another model, batch, precision or GPU count than this job's."""
    job = job_from_args(strip_auto_parallel(argv))
    planned = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    if planned != nodes * gpus_per_node:
        raise SpecError(
            f"{source} is for {planned} GPUs ({plan.cluster.num_nodes} x "
            f"{plan.cluster.gpus_per_node}); this job has {nodes * gpus_per_node} ({nodes} x "
            f"{gpus_per_node})",
            "re-plan for this world size",
        )
    wanted = {
        "num_layers": job.model.num_layers,
        "hidden_size": job.model.hidden_size,
        "num_attention_heads": job.model.num_attention_heads,
        "ffn_hidden_size": job.model.ffn_hidden_size,
    }
    have = {k: getattr(plan.model, k) for k in wanted}
    wanted_t = {
        "global_batch_size": job.training.global_batch_size,
        "seq_length": job.training.seq_length,
        "precision": job.training.precision,
    }
    have_t = {k: getattr(plan.training, k) for k in wanted_t}
    diffs = [f"{k} {have[k]} (command line: {v})" for k, v in wanted.items() if have[k] != v]
    diffs += [f"{k} {have_t[k]} (command line: {v})" for k, v in wanted_t.items() if have_t[k] != v]
    if diffs:
        raise SpecError(f"{source} was made for another job: " + "; ".join(diffs), "re-plan for this command line")
    return job
