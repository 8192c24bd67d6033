"""Price one concrete plan (layer -> stage, layer -> strategy) under a subproblem's tables.

This is the single definition of the objective: the MIQP's optimum must equal the best `evaluate`
over all plans (tests enumerate them), and `uniap evaluate` prices hand-made configurations with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from ..model.graph import TRANSFORMER_KINDS
from ..tolerances import MEMORY_FIT
from .model import BUFFERS, TRANSIENT_CLASSES, offload_exposed
from .strategy import Strategy
from .tables import Subproblem


@dataclass(frozen=True)
class StageMemory:
    """Allocated bytes on one GPU of a stage: model states, in-flight activations, the peaks on top of them
    while computing (recompute, FSDP gathers, buckets), and the model states at the optimizer step's peak
    (its temporaries included); `host`: offloaded states in host memory for this GPU."""

    states: float
    activations: float
    transients: float
    buffers: float
    step_states: float
    host: float = 0.0

    @property
    def training_peak(self) -> float:
        return self.states + self.activations + self.transients

    @property
    def step_peak(self) -> float:
        """During the optimizer step activations are freed; the step's states and the buckets live."""
        return self.step_states + self.buffers

    @property
    def allocated_peak(self) -> float:
        return max(self.training_peak, self.step_peak)


@dataclass(frozen=True)
class Prediction:
    """Time per iteration (TPI) of a 1F1B pipeline and its parts, per-stage memory, feasibility.

    TPI = sum_i p_i + sum_j o_j + (c - 1) * max(max_i p_i, max_j o_j) + max_i g_i
    with p_i the stage's time per micro-batch, o_j the boundary's P2P time per micro-batch and g_i the
    stage's once-per-iteration time (exposed gradient sync, optimizer step). Interleaved over v > 1 chunks per
    rank, with P_r and G_r the sums over rank r's stages: every micro-batch passes each rank at the pace of
    the slowest rank, and the fill and drain take deg - 1 steps of the slowest chunk (Narayanan et al. 2021:
    the bubble shrinks to (deg - 1)/v of a rank's time when the chunks are equal, not when they are not):

    TPI = c * max(max_r P_r, max_j o_j) + (deg - 1) * max_i p_i + sum_j o_j + max_r G_r.

    `stage_memory` is the peak the allocator reserves per GPU of the stage's rank (allocated peak x
    reserved_per_allocated), `memory_capacity` what it may reserve (the device minus what lives outside it);
    `host_capacity` the host memory per GPU offloaded states may take."""

    time_per_iteration: float
    stage_time: list[float]
    boundary_time: list[float]
    stage_iteration_time: list[float]
    stage_memory: list[float]
    memory_capacity: float
    stage_breakdown: list[StageMemory]
    reserved_per_allocated: float
    host_capacity: float = float("inf")

    @property
    def fits(self) -> bool:
        return all(m <= self.memory_capacity * (1 + MEMORY_FIT) for m in self.stage_memory) and self.fits_host

    @property
    def fits_host(self) -> bool:
        return all(m.host <= self.host_capacity * (1 + MEMORY_FIT) for m in self.stage_breakdown)


def pipeline_time(
    stage_time: list[float], boundary_time: list[float], stage_iter: list[float], c: int, deg: int | None = None
) -> float:
    """TPI of the stages (see Prediction); `deg` pipeline ranks hold the stages round-robin (default: one each)."""
    deg = deg or len(stage_time)
    rank_time = [sum(stage_time[r::deg]) for r in range(deg)]
    rank_iter = [sum(stage_iter[r::deg]) for r in range(deg)]
    bottleneck = max(rank_time + boundary_time)
    if len(stage_time) == deg:
        return sum(stage_time) + sum(boundary_time) + (c - 1) * bottleneck + max(rank_iter)
    return c * bottleneck + (deg - 1) * max(stage_time) + sum(boundary_time) + max(rank_iter)


def check_assignment(sub: Subproblem, stage_of: list[int], strategy_of: list[Strategy]) -> None:
    """Raise SpecError unless the plan is in the subproblem's search space (each rule named)."""
    g, cap = sub.graph, sub.capability
    n = len(g.layers)
    if len(stage_of) != n or len(strategy_of) != n:
        raise SpecError(f"plan covers {len(stage_of)} layers, the model has {n}")
    if any(not 0 <= s < sub.stages for s in stage_of):
        raise SpecError(f"plan places a layer outside stages 0..{sub.stages - 1}")
    if set(stage_of) != set(range(sub.stages)):
        raise SpecError("plan leaves a pipeline stage empty")
    for e in g.edges:
        if stage_of[e.src] > stage_of[e.dst]:
            raise SpecError(
                f"plan is not order preserving: {g.layers[e.src].name} (stage {stage_of[e.src]}) "
                f"feeds {g.layers[e.dst].name} (stage {stage_of[e.dst]})"
            )
    if sub.split_counts is not None:
        counts = [0] * sub.stages
        for u, layer in enumerate(g.layers):
            counts[stage_of[u]] += layer.kind in TRANSFORMER_KINDS
        if tuple(counts) != sub.split_counts:
            raise SpecError(
                f"plan splits the transformer layers {counts}; the pinned flags need the split {list(sub.split_counts)}"
            )
    layout: dict[tuple[int, int], int] = {}
    for u, s in enumerate(strategy_of):
        rt = sub.runs[g.run_of[u]]
        if s not in rt.index:
            raise SpecError(
                f"strategy {s.label} is not available to {g.layers[u].name} on a stage of "
                f"{sub.stage_devices} devices under target '{cap.name}' "
                f"(micro-batch {sub.micro_batch_all_replicas} samples)"
            )
        key = (g.run_of[u], stage_of[u])
        if layout.setdefault(key, s.tp) != s.tp:
            raise SpecError(f"layers of one run on one stage must share a TP degree ({g.layers[u].name})")
    problems = cap.violations([(layer.kind, s) for layer, s in zip(g.layers, strategy_of)], sub.deg)
    if problems:
        raise SpecError(problems[0])
    offloaded = sum(s.offload_activations for s in strategy_of)
    if sub.offloaded_layers is not None and offloaded != sub.offloaded_layers:
        raise SpecError(
            f"plan offloads the activations of {offloaded} transformer layers; the pinned flags say "
            f"{sub.offloaded_layers}"
        )


def evaluate(sub: Subproblem, stage_of: list[int], strategy_of: list[Strategy]) -> Prediction:
    """Predicted time and memory of the plan; raises SpecError if it is outside the search space."""
    check_assignment(sub, stage_of, strategy_of)
    g = sub.graph
    n, deg = sub.stages, sub.deg
    p = [0.0] * n
    it = [0.0] * n
    copy, compute = [0.0] * n, [0.0] * n  # per stage: offloaded activations' copy time, the kernels' time
    # Memory is the rank's: the sum over its stages (chunks), the peaks over their layers.
    states, acts, step, host = [0.0] * deg, [0.0] * deg, [0.0] * deg, [0.0] * deg
    peaks = [dict.fromkeys(TRANSIENT_CLASSES, 0.0) for _ in range(deg)]
    for u, s in enumerate(strategy_of):
        cost = sub.cost_of(u, s)
        i = stage_of[u]
        r = sub.rank_of(i)
        p[i] += cost.time_per_microbatch
        it[i] += cost.time_per_iteration
        copy[i] += cost.host_copy_time
        compute[i] += cost.compute_time
        states[r] += cost.state_bytes
        acts[r] += sub.inflight[i] * cost.activation_bytes
        step[r] += cost.step_bytes
        host[r] += cost.host_bytes
        for name in TRANSIENT_CLASSES:
            peaks[r][name] = max(peaks[r][name], getattr(cost, name))
    for i in range(n):
        p[i] += offload_exposed(copy[i], compute[i])
    for e in g.edges:
        if e.kind == "chain" and stage_of[e.src] == stage_of[e.dst]:
            p[stage_of[e.src]] += sub.reshard_time(g.layers[e.src], strategy_of[e.src].tp, strategy_of[e.dst].tp)
    o = [0.0] * (n - 1)
    for u, layer in enumerate(g.layers):
        last_consumer = max((stage_of[e.dst] for e in g.succ(u)), default=stage_of[u])
        for boundary in range(stage_of[u], last_consumer):
            o[boundary] += sub.p2p_time(layer, boundary)
    rank_memory = [
        StageMemory(
            states=states[r],
            activations=acts[r],
            transients=sum(peaks[r].values()),
            buffers=peaks[r][BUFFERS],
            step_states=step[r],
            host=host[r],
        )
        for r in range(deg)
    ]
    breakdown = [rank_memory[sub.rank_of(i)] for i in range(n)]
    ratio = sub.cost_model.reserved_per_allocated
    return Prediction(
        time_per_iteration=pipeline_time(p, o, it, sub.c, deg),
        stage_time=p,
        boundary_time=o,
        stage_iteration_time=it,
        stage_memory=[m.allocated_peak * ratio for m in breakdown],
        memory_capacity=sub.usable_memory,
        stage_breakdown=breakdown,
        reserved_per_allocated=ratio,
        host_capacity=sub.host_capacity,
    )


def even_split(graph, deg: int) -> list[int]:
    """Megatron-style placement: transformer layers spread as evenly as possible (earlier stages take the
    remainder), every other layer on the stage of the next transformer layer (else the previous one)."""
    main = [u for u, layer in enumerate(graph.layers) if layer.kind in TRANSFORMER_KINDS]
    base, extra = divmod(len(main), deg)
    return split_by_counts(graph, [base + (1 if i < extra else 0) for i in range(deg)])


def split_by_counts(graph, counts: list[int]) -> list[int]:
    """Stage of every layer when stage i holds counts[i] consecutive transformer layers; the layers before the
    first transformer layer sit on the first stage and those after the last on the last stage (Megatron's
    embedding and loss, which a layout may leave alone on their stage: counts[0] or counts[-1] = 0)."""
    main = [u for u, layer in enumerate(graph.layers) if layer.kind in TRANSFORMER_KINDS]
    if any(c < 0 for c in counts) or sum(counts) != len(main):
        raise SpecError(
            f"split {','.join(map(str, counts))} must list non-negative transformer-layer counts per "
            f"stage summing to {len(main)}"
        )
    stage_of = [-1] * len(graph.layers)
    if main:
        stage_of[: main[0]] = [0] * main[0]
        stage_of[main[-1] + 1 :] = [len(counts) - 1] * (len(graph.layers) - main[-1] - 1)
    u = 0
    for i, count in enumerate(counts):
        for _ in range(count):
            stage_of[main[u]] = i
            u += 1
    for v in reversed(range(len(graph.layers))):  # others join the next transformer layer's stage
        if stage_of[v] < 0 and v + 1 < len(graph.layers) and stage_of[v + 1] >= 0:
            stage_of[v] = stage_of[v + 1]
    for v in range(len(graph.layers)):  # ... or, at the end, the previous one's
        if stage_of[v] < 0:
            stage_of[v] = stage_of[v - 1] if v > 0 else 0
    return stage_of
