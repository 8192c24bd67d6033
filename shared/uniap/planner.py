"""The one planning path: a job (model, cluster, training, target, pins, profile) in, a `Plan` out.

- the job's TrainingSpec comes with its defaults applied once (uniap.model.spec.training_spec);
- `plan` solves the job (the unified optimization process over one MIQP per subproblem): the `uniap plan`
  command and both adapters call it;
- `configure` prices one hand-made configuration (what `uniap evaluate`, the profilers' calibration runs
  and the benchmarks price);
- `price` rebuilds a saved plan's job and evaluates its exact assignment with today's cost model and an
  optional profile (any split the planner can emit, a stage with only the head included).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field, replace

from .cluster.spec import ClusterSpec
from .cost.evaluate import Prediction, check_assignment, evaluate, even_split, split_by_counts
from .cost.model import CostModel
from .cost.strategy import (
    NO_PINS,
    OFFLOAD_NONE,
    OFFLOAD_PARAMS,
    Capability,
    Pins,
    Strategy,
    capability_for,
    cp_fits_sequence,
    tp_fits_layer,
)
from .cost.tables import Subproblem, build_subproblem
from .errors import InfeasibleError, SpecError
from .model.graph import TRANSFORMER, TRANSFORMER_KINDS, LayerGraph, build_graph
from .model.spec import ModelSpec, TrainingSpec
from .plan import Plan, make_plan
from .report import short_label
from .profile.schema import Profile
from .solver.miqp import DEFAULT_GAP
from .solver.uop import Outcome, optimize


# How the `uniap` command spells each pin; an adapter passes its framework's spelling (Job.pin_flags).
PIN_FLAGS = {
    "tp": "--tp",
    "cp": "--cp",
    "pipeline_degree": "--pp",
    "virtual_stages": "--virtual-stages",
    "micro_batch_per_replica": "--micro-batch-size",
    "offloaded_layers": "--offload-activations",
}


@dataclass(frozen=True)
class Job:
    """What to plan: the model, the cluster, the training, the target framework, the user's fixed choices
    (pins, spelled in refusals as `pin_flags` says) and an optional measured profile."""

    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    target: str = "generic"
    pins: Pins = NO_PINS
    profile: Profile | None = None
    pin_flags: dict[str, str] = field(default_factory=lambda: dict(PIN_FLAGS))
    # The target's capability narrowed by what this launch allows (an adapter's declaration); None: the
    # target's own.
    capability: Capability | None = None


def check_pins(job: Job, graph: LayerGraph, capability: Capability) -> None:
    """Refuse, before solving, a pinned choice no plan can have, naming the rule and the numbers (SpecError,
    exit 2): first what the framework cannot run, in its own words (`capability.check_pins`); then a TP
    degree must divide a node's GPUs and, under sequence parallelism, the sequence, and split the transformer
    layers (heads, FFN, query groups); a CP degree must split the sequence into 2 x CP chunks, each CP rank's
    part divisible by TP; the pipeline degree times the TP and CP degrees must divide the GPUs, with at most
    one stage per layer; the micro-batch size per replica must divide the global batch, and so must
    micro-batch size x data-parallel size when the degrees are pinned."""
    capability.check_pins(job.pins)
    if job.training.precision_aware_optimizer and not capability.precision_aware_optimizer:
        raise SpecError(
            f"target '{capability.name}' has no precision-aware optimizer (lower-precision gradients, master "
            "parameters or moments)",
            "plan with fp32 optimizer states, or for a target that has one (megatron)",
        )
    p, flags, c = job.pins, job.pin_flags, job.cluster
    world, node, gbs = c.num_gpus, c.nvlink_gpus, job.training.global_batch_size
    hint = f"drop the pin to let the planner choose, or change it (target '{job.target}')"
    if p.offload not in (None, OFFLOAD_NONE):
        if c.host_memory_gib is None:
            raise SpecError(
                f"offloading to host memory is asked for, but cluster '{c.name}' does not describe its hosts",
                "add host_memory_gib (and host_memory_bandwidth_gbps, host_link_bandwidth_gbps) to the cluster file",
            )
        if p.zero == 0 or (p.offload == OFFLOAD_PARAMS and p.zero not in (None, 3)):
            raise SpecError(
                f"offloading the {p.offload} needs ZeRO stage {'3' if p.offload == OFFLOAD_PARAMS else '1, 2 or 3'}, "
                f"but ZeRO stage {p.zero} is pinned",
                "pin another ZeRO stage, or drop one of the two pins",
            )
    if p.offloaded_layers:
        layers = sum(layer.kind in TRANSFORMER_KINDS for layer in graph.layers)
        where = f"{flags['offloaded_layers']} {p.offloaded_layers}"
        if p.offloaded_layers >= layers:
            raise SpecError(
                f"{where}: activations stay on the GPU for at least one of the {layers} transformer layers",
                f"offload at most {layers - 1} layers",
            )
        if c.host_memory_gib is None:
            raise SpecError(
                f"{where}: offloading activations to host memory is asked for, but cluster '{c.name}' does not "
                "describe its hosts",
                "add host_memory_gib (and host_link_bandwidth_gbps) to the cluster file",
            )
        if not job.training.fused_kernels:
            raise SpecError(
                f"{where}: activations are offloaded by Transformer Engine, which this job runs without",
                "install Transformer Engine, or drop the offload",
            )
    if p.tp is not None:
        if p.tp > node or node % p.tp or world % p.tp:
            raise SpecError(
                f"{flags['tp']} {p.tp} does not divide the {node} GPUs per "
                f"{'NVLink domain' if c.nvlink_domain else 'node'} (tensor parallelism stays inside one; "
                f"{world} GPUs in all)",
                hint,
            )
        seq = graph.divisibility.get("sequence_length", 0)
        if p.tp > 1 and seq % p.tp:
            raise SpecError(
                f"{flags['tp']} {p.tp} does not divide the sequence length {seq} (sequence parallelism "
                f"splits the sequence over the TP ranks)",
                hint,
            )
        if not tp_fits_layer(p.tp, graph.divisibility, TRANSFORMER):
            d = graph.divisibility
            raise SpecError(
                f"{flags['tp']} {p.tp} does not split the transformer layers: attention heads "
                f"{d['num_attention_heads']}, query groups {d['num_query_groups']} and FFN size "
                f"{d['ffn_hidden_size']} must be divisible by it (query groups: or divide it)",
                hint,
            )
    if p.cp is not None:
        seq = graph.divisibility.get("sequence_length", 0)
        if not cp_fits_sequence(p.cp, p.tp or 1, graph.divisibility):
            raise SpecError(
                f"{flags['cp']} {p.cp} does not split the sequence length {seq}: context parallelism needs it "
                f"divisible by 2 x CP = {2 * p.cp}"
                + (f", and each CP rank's {seq // p.cp} tokens divisible by {flags['tp']} {p.tp}" if p.tp else ""),
                hint,
            )
        if world % (p.cp * (p.tp or 1)):
            raise SpecError(
                f"{flags['cp']} {p.cp}" + (f" x {flags['tp']} {p.tp}" if p.tp else "") + f" does not divide the "
                f"{world} GPUs",
                hint,
            )
    if p.virtual_stages is not None and p.virtual_stages > 1 and p.pipeline_degree == 1:
        raise SpecError(
            f"{flags['virtual_stages']} {p.virtual_stages} interleaves model chunks over pipeline ranks, but "
            f"{flags['pipeline_degree']} is 1 (an interleaved schedule needs more than one)",
            hint,
        )
    if p.pipeline_degree is not None:
        if world % (p.pipeline_degree * (p.tp or 1) * (p.cp or 1)):
            raise SpecError(
                f"{flags['pipeline_degree']} {p.pipeline_degree}"
                + (f" x {flags['tp']} {p.tp}" if p.tp else "")
                + (f" x {flags['cp']} {p.cp}" if p.cp else "")
                + f" does not divide the {world} GPUs",
                hint,
            )
        if p.pipeline_degree > len(graph.layers):
            raise SpecError(
                f"{flags['pipeline_degree']} {p.pipeline_degree} exceeds the model's {len(graph.layers)} "
                f"layers (every pipeline stage needs at least one)",
                hint,
            )
    mbs = p.micro_batch_per_replica
    if mbs is not None:
        if gbs % mbs:
            raise SpecError(
                f"{flags['micro_batch_per_replica']} {mbs} does not divide the global batch size {gbs}", hint
            )
        if p.tp is not None and p.pipeline_degree is not None:
            dp = world // (p.tp * p.pipeline_degree * (p.cp or 1))
            if gbs % (mbs * dp):
                raise SpecError(
                    f"the global batch size {gbs} is not a multiple of {flags['micro_batch_per_replica']} "
                    f"{mbs} x the data-parallel size {dp}",
                    hint,
                )


def check_search_limits(time_limit: float | None, gap: float) -> None:
    """The search's budget and target, refused before any work: a time limit is a positive, finite number of
    seconds (or none), the relative gap a number in [0, 1)."""
    if time_limit is not None and not (
        isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0
    ):
        raise SpecError(
            f"the time limit must be a positive number of seconds (got {time_limit!r})",
            "pass --time-limit 60, or leave it out for no limit",
        )
    if not (isinstance(gap, (int, float)) and 0 <= gap < 1):
        raise SpecError(f"the optimality gap must be in [0, 1) (got {gap!r})", "pass --gap 1e-4, the default")


def plan(
    job: Job, time_limit: float | None = None, gap: float = DEFAULT_GAP, progress: bool | None = None
) -> tuple[Plan, Outcome]:
    """The optimal plan of `job` (or the best found within `time_limit`) and the search's outcome; raises
    InfeasibleError when no plan fits, SolverTimeLimitError when time ran out before any plan."""
    check_search_limits(time_limit, gap)
    capability = job.capability or capability_for(job.target)
    job = replace(job, training=capability.job_training(job.training))
    graph = build_graph(job.model, job.training)
    check_pins(job, graph, capability)
    cost_model = CostModel(job.cluster, job.training, job.profile, capability.vocab_multiple)
    outcome = optimize(
        graph,
        job.cluster,
        job.training,
        capability,
        cost_model,
        pins=job.pins,
        time_limit=time_limit,
        gap=gap,
        progress=progress,
    )
    best = outcome.best
    made = make_plan(
        outcome.sub, best.stage_of, best.strategy_of, outcome.prediction, job.model, outcome.solver_report(), job.pins
    )
    variant = next((s for s in best.strategy_of if s.offload != OFFLOAD_NONE or s.zeropp), None)
    if variant is not None:
        what = variant.zero_label
        if job.pins.offload not in (None, OFFLOAD_NONE):
            made.notes.append(f"{what}: offloading was pinned")
        else:
            plain = replace(capability, offload_modes=(OFFLOAD_NONE,), zeropp=False)
            made.notes.append(
                alternative_note(job, graph, plain, cost_model, made, what, "offloading or ZeRO++", time_limit, gap)
            )
    if made.offloaded_layers:
        what = f"activations of {made.offloaded_layers} transformer layer(s) offloaded to host memory"
        basis = (
            "; their copies are priced at the host link's datasheet bandwidth (estimated), hidden behind the "
            "compute where they fit in it (as on the published GB200/GB300 runs that offload)"
        )
        if job.pins.offloaded_layers:
            made.notes.append(f"{what}: pinned{basis}")
        else:
            plain = replace(capability, activation_offload=False)
            without = "offloaded activations"
            note = alternative_note(job, graph, plain, cost_model, made, what, without, time_limit, gap)
            made.notes.append(note + basis)
    return made, outcome


def alternative_note(
    job: Job,
    graph: LayerGraph,
    narrowed: Capability,
    cost_model: CostModel,
    made: Plan,
    what: str,
    without: str,
    time_limit: float | None,
    gap: float,
) -> str:
    """Why the plan chose `what`: nothing else fits, or how much faster it is than the best plan `without` it
    (planned again under the `narrowed` capability)."""
    try:
        other = optimize(
            graph,
            job.cluster,
            job.training,
            narrowed,
            cost_model,
            pins=job.pins,
            time_limit=time_limit,
            gap=gap,
            progress=False,
        )
    except InfeasibleError as exc:
        return f"{what} chosen because no plan without {without} fits: {exc.message}"
    plain = make_plan(other.sub, other.best.stage_of, other.best.strategy_of, other.prediction, job.model, {})
    gain = plain.time_per_iteration / made.time_per_iteration - 1
    return (
        f"{what} chosen: {gain * 100:.1f}% faster than the best plan without {without} "
        f"({short_label(plain)}, {plain.time_per_iteration:.3f} s/iteration)"
    )


def ineffective_pins(plan: Plan, pins: Pins) -> list[str]:
    """The pinned choices `plan` honours only because they change nothing there, each with the reason, for the
    user who pinned them to read (a pin is never dropped silently)."""
    notes = []
    sharded = [lp.strategy for lp in plan.layers if lp.strategy.shards > 1 or lp.strategy.offload != OFFLOAD_NONE]
    if pins.zero and not sharded:
        notes.append(
            f"ZeRO stage {pins.zero} was pinned, but every stage of the plan has one data-parallel replica "
            f"(data parallel {plan.data_parallel_size}): ZeRO shards over data-parallel ranks and has nothing "
            "to shard, so the plan runs stage 0"
        )
    return notes


@dataclass(frozen=True)
class PricedPlan:
    """A plan's subproblem tables, assignment and prediction under one cost model."""

    sub: Subproblem
    stage_of: list[int]
    strategy_of: list
    prediction: Prediction


def price(plan: Plan, profile: Profile | None = None) -> PricedPlan:
    """Evaluate `plan`'s placement and strategies; SpecError when the plan does not match its own model."""
    model, cluster, training = plan.model, plan.cluster, plan.training
    graph = build_graph(model, training)
    names = [layer.name for layer in graph.layers]
    if [lp.name for lp in plan.layers] != names:
        raise SpecError(
            f"the plan lists {len(plan.layers)} layers that do not match its model's "
            f"{len(names)} ({names[0]} .. {names[-1]})",
            "re-plan with this uniap version",
        )
    capability = capability_for(plan.target)
    training = capability.job_training(training)
    sub = build_subproblem(
        graph,
        cluster,
        training,
        capability,
        CostModel(cluster, training, profile, capability.vocab_multiple),
        plan.pipeline_degree,
        plan.micro_batches,
        v=plan.virtual_stages,
    )
    stage_of = [lp.stage for lp in plan.layers]
    strategy_of = [lp.strategy for lp in plan.layers]
    return PricedPlan(sub, stage_of, strategy_of, evaluate(sub, stage_of, strategy_of))


def load_priced(path: str | Path, profile: Profile | None = None) -> tuple[Plan, PricedPlan]:
    """A saved plan, checked as a whole before any command uses it: read (each field's type, uniap.plan) and
    priced with today's cost model and `profile` (its layers its model's, its stages and strategies in its own
    search space on its own cluster): a hand-edited plan that `uniap evaluate --plan` refuses is refused by every
    command. The pricing comes back for the commands that report it, so none prices a plan twice."""
    plan = Plan.load(path)
    try:
        priced = price(plan, profile)
    except SpecError as exc:
        raise SpecError(
            f"plan {path} does not hold together: {exc.message}", "re-plan; do not edit the file by hand"
        ) from None
    return plan, priced


def load_plan(path: str | Path) -> Plan:
    """A saved plan, checked as a whole (`load_priced`)."""
    return load_priced(path)[0]


def configure(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    target: str = "generic",
    tp: int = 1,
    pp: int = 1,
    micro_batch_size: int = 1,
    zero: int = 0,
    recompute: str = "none",
    split: list[int] | None = None,
    profile: Profile | None = None,
    cp: int = 1,
    offload: str = OFFLOAD_NONE,
    zeropp: bool = False,
    virtual_stages: int = 1,
    offloaded_layers: int = 0,
) -> tuple[Plan, Prediction]:
    """The plan of one configuration as Megatron-LM names it (TP, CP, PP, model chunks per pipeline rank,
    micro-batch size per replica, DP = GPUs / (TP x CP x PP)), every transformer layer alike but for the first
    `offloaded_layers`, whose activations wait in host memory, the split even over the PP x chunks stages unless
    `split` lists transformer layers per stage, with a ZeRO variant where the target runs one (Strategy);
    SpecError names the rule a configuration breaks."""
    if min(tp, cp, pp, micro_batch_size, virtual_stages) < 1:
        raise SpecError("tp, cp, pp, the model chunks per rank and the micro-batch size must be positive")
    capability = capability_for(target)
    training = capability.job_training(training)
    graph = build_graph(model, training)
    pins = Pins(
        tp=tp,
        cp=cp,
        pipeline_degree=pp,
        zero=zero,
        recompute=recompute,
        micro_batch_per_replica=micro_batch_size,
        offload=offload,
        virtual_stages=virtual_stages,
        offloaded_layers=offloaded_layers,
    )
    check_pins(Job(model=model, cluster=cluster, training=training, target=target, pins=pins), graph, capability)
    n = cluster.num_gpus
    if n % (tp * cp * pp):
        raise SpecError(
            f"the {n} GPUs are not divisible by tp*cp*pp = {tp * cp * pp}",
            "choose degrees whose product divides the GPU count",
        )
    dp = n // (tp * cp * pp)
    micro_batch = micro_batch_size * dp
    if training.global_batch_size % micro_batch:
        raise SpecError(
            f"global batch {training.global_batch_size} is not divisible by micro-batch-size x dp = "
            f"{micro_batch_size} x {dp}",
            "change the global batch size or the micro-batch size",
        )
    if zero and dp * cp == 1 and offload == OFFLOAD_NONE:
        raise SpecError(f"ZeRO stage {zero} needs data parallelism (or context parallelism), but dp = cp = 1 here")
    micro_batches = training.global_batch_size // micro_batch
    if virtual_stages > 1 and micro_batches % pp:
        raise SpecError(
            f"{virtual_stages} model chunks per rank need the {micro_batches} micro-batches to be a multiple of the "
            f"pipeline degree {pp} (Megatron-LM's interleaved schedule)",
            "change the global batch or the micro-batch size",
        )
    sub = build_subproblem(
        graph,
        cluster,
        training,
        capability,
        CostModel(cluster, training, profile, capability.vocab_multiple),
        pp,
        micro_batches,
        pins,
        virtual_stages,
    )
    stage_of = split_by_counts(graph, split) if split else even_split(graph, pp * virtual_stages)
    sharded = dp * cp > 1 or offload != OFFLOAD_NONE
    transformer = [u for u, layer in enumerate(graph.layers) if layer.kind in TRANSFORMER_KINDS]
    offloaded = set(transformer[:offloaded_layers])
    strategy_of = [
        Strategy(
            tp,
            dp,
            zero if sharded else 0,
            recompute if layer.kind in TRANSFORMER_KINDS else "none",
            cp,
            offload=offload if sharded and zero else OFFLOAD_NONE,
            zeropp=zeropp,
            offload_activations=u in offloaded,
        )
        for u, layer in enumerate(graph.layers)
    ]
    check_assignment(sub, stage_of, strategy_of)
    prediction = evaluate(sub, stage_of, strategy_of)
    return make_plan(sub, stage_of, strategy_of, prediction, model, {}), prediction
