"""Cost tables of one subproblem (pipeline degree `deg`, micro-batch count `c`): the paper's A and M
per run and strategy, resharding R between layouts on a stage, cross-stage R' per boundary.

Everything the MIQP and the evaluator need is a number in these tables, so both price a plan
identically.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ..cluster.spec import ClusterSpec
from ..model.graph import CHAIN, TRANSFORMER_KINDS, Layer, LayerGraph, Run
from ..model.spec import TrainingSpec
from ..tolerances import ROUNDING
from .model import CostModel, LayerCost
from .strategy import NO_PINS, Capability, Pins, Strategy, stage_strategies


@dataclass
class RunTable:
    """The strategies one run may use on any stage, and the cost of one of its layers under each."""

    run: Run
    layer: Layer
    strategies: list[Strategy]
    costs: list[LayerCost]

    @cached_property
    def index(self) -> dict[Strategy, int]:
        """Position of each strategy in `strategies` (and `costs`)."""
        return {s: k for k, s in enumerate(self.strategies)}

    @cached_property
    def layouts(self) -> list[int]:
        """Distinct TP degrees (the activation layout between layers) among the strategies."""
        return sorted({s.tp for s in self.strategies})


@dataclass
class Subproblem:
    """Tables for one (pipeline degree, micro-batch count) pair, with `v` model chunks per pipeline rank (the
    interleaved 1F1B schedule when v > 1): the layers are placed on `stages` = deg * v consecutive
    (virtual) stages, stage j running on rank j % deg. `inflight[j]`: micro-batches whose activations stage
    j keeps at its rank's peak; `boundary_intra_node[b]`: whether the boundary after stage b stays in a node.
    `memory_capacity` is the budget in allocated bytes per GPU (see build_subproblem). `split_counts`: the
    transformer layers each stage must hold where the split is fixed (`fixed_counts`), else None.
    `offloaded_layers`: the transformer layers whose activations a pin sends to host memory, else None."""

    graph: LayerGraph
    capability: Capability
    training: TrainingSpec
    cluster: ClusterSpec
    deg: int
    c: int
    runs: list[RunTable]
    inflight: list[float]
    memory_capacity: float
    boundary_intra_node: list[bool]
    cost_model: CostModel = field(repr=False)
    v: int = 1
    split_counts: tuple[int, ...] | None = None
    offloaded_layers: int | None = None

    @property
    def stages(self) -> int:
        """Stages the layers are placed on: deg pipeline ranks x v chunks each."""
        return self.deg * self.v

    def rank_of(self, stage: int) -> int:
        return stage % self.deg

    @property
    def usable_memory(self) -> float:
        """Bytes per GPU the caching allocator may reserve: the device minus what lives outside it, less the
        safety margin kept while the reserved/allocated ratio is estimated (CostModel.memory_margin)."""
        return self.cluster.usable_memory_bytes * (1.0 - self.cost_model.memory_margin)

    @property
    def host_capacity(self) -> float:
        """Bytes of host memory per GPU offloaded states may take (inf where the cluster does not say)."""
        host = self.cluster.host_memory_per_gpu_bytes
        return float("inf") if host is None else host

    @property
    def micro_batch_all_replicas(self) -> int:
        """Samples in one pipeline micro-batch, all data-parallel replicas of a stage together."""
        return self.training.global_batch_size // self.c

    @property
    def stage_devices(self) -> int:
        return self.cluster.num_gpus // self.deg

    @property
    def stage_intra_node(self) -> bool:
        return self.stage_devices <= self.cluster.nvlink_gpus

    @property
    def feasible_strategies(self) -> bool:
        """Every run has a strategy, and a pinned count of offloaded layers has layers that may offload (none
        may at PP > 1: such a subproblem has no plan that keeps the pin)."""
        if not all(rt.strategies for rt in self.runs):
            return False
        return not self.offloaded_layers or any(s.offload_activations for rt in self.runs for s in rt.strategies)

    def reshard_time(self, layer: Layer, tp_from: int, tp_to: int) -> float:
        """Changing the activation layout between consecutive layers on one stage: an all-to-all among
        the devices whose batch/sequence split changes, forward and backward (the paper's R)."""
        if tp_from == tp_to or layer.output_bytes == 0:
            return 0.0
        group = max(tp_from, tp_to) // min(tp_from, tp_to)
        per_device = layer.output_bytes * self.micro_batch_all_replicas / self.stage_devices
        return 2.0 * self.cost_model.collective("all_to_all", per_device * group, group, True)

    def p2p_time(self, layer: Layer, boundary: int) -> float:
        """Sending `layer`'s output across pipeline boundary `boundary` (stage b to b+1) for one
        micro-batch, forward activation and backward gradient (the paper's R'). Activations are split
        over all of a stage's devices (sequence parallel x data parallel), each sending its share."""
        per_device = layer.output_bytes * self.micro_batch_all_replicas / self.stage_devices
        return 2.0 * self.cost_model.p2p(per_device, self.boundary_intra_node[boundary])

    @cached_property
    def chain_run_edges(self) -> list[tuple[int, int]]:
        """Pairs of runs (a, b) joined by a chain edge from a's last layer to b's first layer."""
        g = self.graph
        return sorted(
            {
                (g.run_of[e.src], g.run_of[e.dst])
                for e in g.edges
                if e.kind == CHAIN and g.run_of[e.src] != g.run_of[e.dst]
            }
        )

    @cached_property
    def run_successors(self) -> dict[int, list[tuple[int, str]]]:
        """For each run, the other runs its last layer feeds, with the edge kind."""
        g, out = self.graph, {}
        for e in g.edges:
            a, b = g.run_of[e.src], g.run_of[e.dst]
            if a != b:
                out.setdefault(a, set()).add((b, e.kind))
        return {a: sorted(v) for a, v in out.items()}

    def tie_key(self, rt: RunTable, s: Strategy) -> tuple:
        """The values of `s` that every layer must share (None where no tie applies to it): the CP degree
        always, and the TP degree, ZeRO stage (with its variant) and recompute mode where the capability makes
        them uniform."""
        cap = self.capability
        return (
            s.cp,
            s.tp if cap.uniform_tp else None,
            s.zero_variant if cap.uniform_zero else None,
            s.recompute if cap.uniform_recompute and rt.layer.kind in TRANSFORMER_KINDS else None,
        )

    def tie_groups(self) -> list[list[np.ndarray]]:
        """Per combination of tied values some plan could take, each run's mask of the strategies consistent
        with it (a plan obeys every tie, so it lies within one combination)."""
        keys = [[self.tie_key(rt, s) for s in rt.strategies] for rt in self.runs]
        values = [sorted({k[i] for ks in keys for k in ks if k[i] is not None}) or [None] for i in range(4)]
        # Each run's keys as value indices, -1 where no tie applies (consistent with every combination).
        codes = [
            np.array(
                [[-1 if k[i] is None else values[i].index(k[i]) for i in range(4)] for k in ks], dtype=int
            ).reshape(-1, 4)
            for ks in keys
        ]
        groups = []
        for combo in itertools.product(*(range(len(v)) for v in values)):
            want = np.array(combo)
            masks = [((c == want) | (c < 0)).all(axis=1) for c in codes]
            if all(m.any() for m in masks):
                groups.append(masks)
        return groups

    @cached_property
    def group_bounds(self) -> list[tuple[list[np.ndarray], float]]:
        """Each tied combination's strategy masks (`tie_groups`) with a valid lower bound on the time per
        iteration of any plan within it (inf: none fits).

        TPI >= sum(p) * (deg+c-1)/deg + sum(g)/deg, since max(p) and max(g) are at least the means.
        The layers' strategies must keep the sum over stages of (states + one micro-batch of
        activations) within deg x capacity, so the cheapest such choice is a knapsack whose LP
        relaxation bounds the sums; its Lagrangian dual, evaluated at every breakpoint of the
        multiplier, is the bound (each multiplier gives a valid bound by weak duality)."""
        # Interleaved: TPI >= c max_r P_r + (deg - 1) max_i p_i >= S (c v + deg - 1) / (v deg), S: sum of stage times.
        w_time, w_iter = (self.deg + self.c * self.v - 1) / (self.deg * self.v), 1.0 / self.deg
        weights, memory = [], []
        for rt in self.runs:
            weights.append(np.array([w_time * c.time_per_microbatch + w_iter * c.time_per_iteration for c in rt.costs]))
            memory.append(np.array([c.state_bytes + c.activation_bytes for c in rt.costs]) / self.memory_capacity)
        sizes = [rt.run.size for rt in self.runs]
        return [
            (
                masks,
                _knapsack_bound(
                    sizes, [w[m] for w, m in zip(weights, masks)], [x[m] for x, m in zip(memory, masks)], self.deg
                ),
            )
            for masks in self.tie_groups()
        ]

    def lower_bound(self) -> float:
        """A valid lower bound on this subproblem's time per iteration (inf: provably no plan): every plan
        keeps the ties, so the least of the tied combinations' bounds (`group_bounds`)."""
        if not self.feasible_strategies:
            return float("inf")
        return min((bound for _, bound in self.group_bounds), default=float("inf"))

    def restricted(self, cutoff: float) -> "Subproblem":
        """The same subproblem without the strategies of tied combinations whose bound is not below `cutoff`:
        none of their plans can beat a plan of that time, so the optimum below the cutoff is unchanged and
        the MIQP is smaller."""
        keep = [np.zeros(len(rt.strategies), dtype=bool) for rt in self.runs]
        for masks, bound in self.group_bounds:
            if bound < cutoff:
                keep = [k | m for k, m in zip(keep, masks)]
        if all(k.all() for k in keep):
            return self
        runs = [
            RunTable(
                rt.run, rt.layer, [s for s, ok in zip(rt.strategies, k) if ok], [c for c, ok in zip(rt.costs, k) if ok]
            )
            for rt, k in zip(self.runs, keep)
        ]
        return replace(self, runs=runs)

    def least_memory(self) -> float:
        """Lower bound on the memory the allocator reserves on the fullest stage: every layer at its leanest
        strategy, spread perfectly over the stages."""
        if not self.feasible_strategies:
            return float("inf")
        total = sum(
            rt.run.size * min(cost.state_bytes + cost.activation_bytes for cost in rt.costs) for rt in self.runs
        )
        return total / self.deg * self.cost_model.reserved_per_allocated

    def cost_of(self, u: int, s: Strategy) -> LayerCost:
        """The cost of layer u under strategy s (one of its run's strategies)."""
        rt = self.runs[self.graph.run_of[u]]
        return rt.costs[rt.index[s]]


def fixed_counts(transformer_layers: int, stages: int, account_ends: bool) -> tuple[int, ...] | None:
    """Transformer layers per stage of a split Megatron fixes without a free layout: equal on every stage, or,
    with `account_ends`, equal counting the embedding and the loss as one layer each (the first and last stage
    hold one fewer: Megatron-Bridge's account_for_embedding/loss_in_pipeline_split); None: the layers do not
    split so."""
    if transformer_layers % stages == 0:
        return (transformer_layers // stages,) * stages
    if account_ends and stages >= 2 and (transformer_layers + 2) % stages == 0:
        k = (transformer_layers + 2) // stages
        return (k - 1,) + (k,) * (stages - 2) + (k - 1,)
    return None


def inflight_microbatches(deg: int, c: int, v: int) -> list[float]:
    """Per stage, micro-batches whose activations it holds at its rank's peak. 1F1B: stage i keeps min(deg - i,
    c). Interleaved (megatron-core 0.16.1 pipeline_parallel/schedules.py): rank r runs (deg - r - 1) * 2 +
    (v - 1) * deg warm-up chunk forwards before its first backward, so it holds min(that + 1, c v) chunk
    micro-batches, counted here as that / v on each of its v chunks (Korthikanti et al.'s deg + (deg-1)/v on
    the first rank)."""
    if v == 1:
        return [float(min(deg - i, c)) for i in range(deg)]
    return [min((deg - j % deg - 1) * 2 + (v - 1) * deg + 1, c * v) / v for j in range(deg * v)]


# The search offers activation offload only over a host link as fast as NVLink-C2C's (GB200/GB300: about 225
# GB/s per GPU and direction), where published runs used it and their copies hid behind the compute (Megatron-
# Bridge's Llama-3 FSDP rows, benchmarks/RESULTS.md). Over PCIe nothing measured it: a plan offloads there only
# where the user pins a count.
ACTIVATION_OFFLOAD_MIN_LINK_GBPS = 200.0


def offers_activation_offload(cluster: ClusterSpec, training: TrainingSpec, pins: Pins) -> bool:
    """Whether the layers may keep activations in host memory: Transformer Engine does the copies (fused kernels),
    over a host link that published runs show fast enough, or as pinned."""
    fast = cluster.host_link_bandwidth_gbps >= ACTIVATION_OFFLOAD_MIN_LINK_GBPS
    return training.fused_kernels and (fast or bool(pins.offloaded_layers))


def run_tables(
    graph: LayerGraph,
    cluster: ClusterSpec,
    training: TrainingSpec,
    capability: Capability,
    cost_model: CostModel,
    deg: int,
    c: int,
    pins: Pins = NO_PINS,
) -> list[RunTable]:
    """Each run's strategies on a stage of (deg, c) and the cost of one of its layers under each."""
    n = cluster.num_gpus // deg
    mb = training.global_batch_size // c
    G = cluster.nvlink_gpus
    runs = []
    for run in graph.runs:
        layer = graph.layers[run.first]
        strategies = stage_strategies(
            n,
            G,
            mb,
            deg,
            capability,
            layer.kind,
            graph.divisibility,
            training.flash_attention,
            pins,
            host=cluster.host_memory_gib is not None,
            offload_activations=offers_activation_offload(cluster, training, pins),
        )
        costs = [cost_model.layer_cost(layer, s, mb, deg, n <= G, capability.accounting) for s in strategies]
        runs.append(RunTable(run, layer, strategies, costs))
    return runs


def build_subproblem(
    graph: LayerGraph,
    cluster: ClusterSpec,
    training: TrainingSpec,
    capability: Capability,
    cost_model: CostModel,
    deg: int,
    c: int,
    pins: Pins = NO_PINS,
    v: int = 1,
    fixed_split: bool = False,
    runs: list[RunTable] | None = None,
) -> Subproblem:
    """The tables of subproblem (deg, c, v). The transformer layers split evenly over the stages where the pins
    say so (a user's Megatron flag), or as Megatron's `fixed_counts` allow where `fixed_split` (the search's
    many-chunk subproblems). `runs`: the run tables of the same (deg, c) and pins under another v, which they
    do not depend on (the search prices them once per pair)."""
    n = cluster.num_gpus // deg
    G = cluster.nvlink_gpus
    runs = runs if runs is not None else run_tables(graph, cluster, training, capability, cost_model, deg, c, pins)
    inflight = inflight_microbatches(deg, c, v)
    # Ranks are consecutive blocks of n GPUs; a boundary stays inside a node when both sides do.
    node = [r * n // G for r in range(deg)]
    boundary_intra = [n < G and node[b % deg] == node[(b + 1) % deg] for b in range(deg * v - 1)]
    # Every memory figure of the tables is allocated bytes; the allocator reserves more than that at the
    # peak, so the allocated budget is the usable memory over the reserved-per-allocated ratio.
    capacity = cluster.usable_memory_bytes * (1.0 - cost_model.memory_margin) / cost_model.reserved_per_allocated
    split_counts = None
    if pins.even_split or fixed_split:
        transformer_layers = sum(layer.kind in TRANSFORMER_KINDS for layer in graph.layers)
        split_counts = fixed_counts(transformer_layers, deg * v, account_ends=not pins.even_split)
    return Subproblem(
        graph=graph,
        capability=capability,
        training=training,
        cluster=cluster,
        deg=deg,
        c=c,
        runs=runs,
        inflight=inflight,
        memory_capacity=capacity,
        boundary_intra_node=boundary_intra,
        cost_model=cost_model,
        v=v,
        split_counts=split_counts,
        offloaded_layers=pins.offloaded_layers,
    )


def _knapsack_bound(sizes: list[int], weights: list[np.ndarray], memory: list[np.ndarray], budget: float) -> float:
    """max over multipliers lam >= 0 of sum_r |r| min_k (w_rk + lam m_rk) - lam budget (inf if even the leanest
    choice exceeds the budget): the Lagrangian dual of choosing one strategy per layer at least weight."""
    if sum(n * m.min() for n, m in zip(sizes, memory)) > budget * (1 + ROUNDING):
        return float("inf")
    multipliers = {0.0}
    for w, m in zip(weights, memory):
        dw, dm = w[:, None] - w[None, :], m[None, :] - m[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = dw / dm
        multipliers.update(ratio[(dm > 0) & (ratio > 0) & np.isfinite(ratio)].tolist())
    lam = np.array(sorted(multipliers))
    dual = -lam * budget
    for n, w, m in zip(sizes, weights, memory):
        dual = dual + n * (w[None, :] + lam[:, None] * m[None, :]).min(axis=1)
    return float(max(0.0, dual.max()))
