"""Cost tables of one subproblem (pipeline degree `deg`, micro-batch count `c`): the paper's A and M
per run and strategy, resharding R between layouts on a stage, cross-stage R' per boundary.

Everything the MIQP and the evaluator need is a number in these tables, so both price a plan
identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..cluster.spec import ClusterSpec
from ..model.graph import CHAIN, Layer, LayerGraph, Run
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
    def layouts(self) -> list[int]:
        """Distinct TP degrees (the activation layout between layers) among the strategies."""
        return sorted({s.tp for s in self.strategies})


@dataclass
class Subproblem:
    """Tables for one (pipeline degree, micro-batch count) pair. `memory_capacity` is the budget in
    allocated bytes per GPU (see build_subproblem)."""

    graph: LayerGraph
    capability: Capability
    training: TrainingSpec
    cluster: ClusterSpec
    deg: int
    c: int
    runs: list[RunTable]
    inflight: list[int]
    memory_capacity: float
    boundary_intra_node: list[bool]
    cost_model: CostModel = field(repr=False)

    @property
    def usable_memory(self) -> float:
        """Bytes per GPU the caching allocator may reserve (the device minus what lives outside it)."""
        return self.cluster.usable_memory_bytes

    @property
    def micro_batch_all_replicas(self) -> int:
        """Samples in one pipeline micro-batch, all data-parallel replicas of a stage together."""
        return self.training.global_batch_size // self.c

    @property
    def stage_devices(self) -> int:
        return self.cluster.num_gpus // self.deg

    @property
    def stage_intra_node(self) -> bool:
        return self.stage_devices <= self.cluster.gpus_per_node

    @property
    def feasible_strategies(self) -> bool:
        return all(rt.strategies for rt in self.runs)

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

    def lower_bound(self) -> float:
        """A valid lower bound on this subproblem's time per iteration (inf: provably no plan).

        TPI >= sum(p) * (deg+c-1)/deg + sum(g)/deg, since max(p) and max(g) are at least the means.
        The layers' strategies must keep the sum over stages of (states + one micro-batch of
        activations) within deg x capacity, so the cheapest such choice is a knapsack whose LP
        relaxation bounds the sums; its Lagrangian dual, evaluated at every breakpoint of the
        multiplier, is the bound (each multiplier gives a valid bound by weak duality)."""
        if not self.feasible_strategies:
            return float("inf")
        w_time, w_iter = (self.deg + self.c - 1) / self.deg, 1.0 / self.deg
        weights, memory = [], []
        for rt in self.runs:
            weights.append(np.array([w_time * c.time_per_microbatch + w_iter * c.time_per_iteration for c in rt.costs]))
            memory.append(np.array([c.state_bytes + c.activation_bytes for c in rt.costs]) / self.memory_capacity)
        budget = float(self.deg)
        if sum(rt.run.size * m.min() for rt, m in zip(self.runs, memory)) > budget * (1 + ROUNDING):
            return float("inf")
        multipliers = {0.0}
        for w, m in zip(weights, memory):
            dw, dm = w[:, None] - w[None, :], m[None, :] - m[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = dw / dm
            multipliers.update(ratio[(dm > 0) & (ratio > 0) & np.isfinite(ratio)].tolist())
        lam = np.array(sorted(multipliers))
        dual = -lam * budget
        for rt, w, m in zip(self.runs, weights, memory):
            dual = dual + rt.run.size * (w[None, :] + lam[:, None] * m[None, :]).min(axis=1)
        return float(max(0.0, dual.max()))

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
        return rt.costs[rt.strategies.index(s)]


def build_subproblem(
    graph: LayerGraph,
    cluster: ClusterSpec,
    training: TrainingSpec,
    capability: Capability,
    cost_model: CostModel,
    deg: int,
    c: int,
    pins: Pins = NO_PINS,
) -> Subproblem:
    n = cluster.num_gpus // deg
    mb = training.global_batch_size // c
    G = cluster.gpus_per_node
    runs = []
    for run in graph.runs:
        layer = graph.layers[run.first]
        strategies = stage_strategies(
            n, G, mb, deg, capability, layer.kind, graph.divisibility, training.flash_attention, pins
        )
        costs = [cost_model.layer_cost(layer, s, mb, deg, n <= G, capability.accounting) for s in strategies]
        runs.append(RunTable(run, layer, strategies, costs))
    # Stage i of a 1F1B pipeline keeps the activations of min(deg - i, c) micro-batches alive.
    inflight = [min(deg - i, c) for i in range(deg)]
    # Stages are consecutive blocks of n ranks; a boundary stays inside a node when both sides do.
    boundary_intra = [n < G and ((i + 1) * n) % G != 0 for i in range(deg - 1)]
    # Every memory figure of the tables is allocated bytes; the allocator reserves more than that at the
    # peak, so the allocated budget is the usable memory over the reserved-per-allocated ratio.
    capacity = cluster.usable_memory_bytes / cost_model.reserved_per_allocated
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
    )
