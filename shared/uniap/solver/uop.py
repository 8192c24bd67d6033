"""The unified optimization process (UOP): one MIQP per (pipeline degree, micro-batch count) -- and, where
the target interleaves, per number of model chunks per pipeline rank --, the best plan over all of them.

Subproblems are visited in order of a valid lower bound on their time per iteration; one whose bound
is not below the incumbent is pruned (it cannot hold a better plan), so the answer stays optimal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from ..cluster.spec import ClusterSpec
from ..cost.evaluate import Prediction, evaluate
from ..cost.model import CostModel
from ..cost.strategy import FREE_SPLIT_VIRTUAL_STAGES, NO_PINS, Capability, Pins
from ..cost.tables import Subproblem, build_subproblem, fixed_counts
from ..errors import InfeasibleError, SolverTimeLimitError, SpecError
from ..model.graph import TRANSFORMER_KINDS, LayerGraph
from ..model.spec import TrainingSpec
from ..tolerances import SAME_OBJECTIVE, SOLVER_GAP
from .heuristic import best_uniform_plan
from .miqp import DEFAULT_GAP, SubproblemResult, least_memory_needed, solve_subproblem

log = logging.getLogger(__name__)
GiB = 2**30


@dataclass
class Outcome:
    """The best subproblem, its tables and prediction, and every subproblem's result."""

    best: SubproblemResult
    sub: Subproblem
    prediction: Prediction
    results: list[SubproblemResult]
    status: str
    gap: float
    seconds: float
    lower_bound: float = field(default=0.0)

    def solver_report(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            "backend": "cvxpy+SCIP",
            "status": self.status,
            "gap": self.gap,
            "lower_bound": self.lower_bound,
            "seconds": round(self.seconds, 3),
            "subproblem_counts": counts,
            "subproblems": [r.to_dict() for r in self.results],
        }


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_pairs(
    graph: LayerGraph, cluster: ClusterSpec, training: TrainingSpec, capability: Capability, pins: Pins
) -> list[tuple[int, int, int]]:
    """(deg, c, v): deg divides the GPU count (equal stages), c divides the global batch, v model chunks per
    rank (the capability's; v > 1 only with deg > 1 and c a multiple of deg, Megatron's interleaved schedule
    rule; above FREE_SPLIT_VIRTUAL_STAGES only where the transformer layers split over the chunks as Megatron
    fixes them, `fixed_counts`), at
    most one stage per layer; pins and the capability's pipeline limit restrict all three."""
    degs = [d for d in divisors(cluster.num_gpus) if d <= len(graph.layers)]
    if capability.max_pipeline_degree:
        degs = [d for d in degs if d <= capability.max_pipeline_degree]
    if pins.pipeline_degree is not None:
        if cluster.num_gpus % pins.pipeline_degree:
            raise SpecError(
                f"pinned pipeline degree {pins.pipeline_degree} does not divide the {cluster.num_gpus} GPUs",
                "pin a divisor of the GPU count",
            )
        degs = [d for d in degs if d == pins.pipeline_degree]
    cs = divisors(training.global_batch_size)
    if pins.micro_batches is not None:
        cs = [c for c in cs if c == pins.micro_batches]
    transformer_layers = sum(layer.kind in TRANSFORMER_KINDS for layer in graph.layers)
    vs = capability.virtual_stages if pins.virtual_stages is None else (pins.virtual_stages,)
    found = [
        (d, c, v)
        for d in degs
        for c in cs
        for v in vs
        if (v == 1 or (d > 1 and c % d == 0 and d * v <= len(graph.layers)))
        and not (pins.even_split and transformer_layers % (d * v))
        and (v <= FREE_SPLIT_VIRTUAL_STAGES or fixed_counts(transformer_layers, d * v, True) is not None)
    ]
    if not found and pins.virtual_stages is not None:
        raise SpecError(
            f"no pipeline degree runs {pins.virtual_stages} model chunks per rank here: it must divide the "
            f"{cluster.num_gpus} GPUs, be more than 1, divide the micro-batch count, and split the "
            f"{transformer_layers} transformer layers evenly into pipeline degree x {pins.virtual_stages} chunks",
            "change the chunks per rank (or drop the pin), or pin a pipeline degree that fits",
        )
    return found


def optimize(
    graph: LayerGraph,
    cluster: ClusterSpec,
    training: TrainingSpec,
    capability: Capability,
    cost_model: CostModel,
    pins: Pins = NO_PINS,
    time_limit: float | None = None,
    gap: float = DEFAULT_GAP,
    progress: bool | None = None,
) -> Outcome:
    """Solve every subproblem (or prune it by its bound) and return the best plan found.

    Raises InfeasibleError when no plan fits (with the least memory any candidate needs) and
    SolverTimeLimitError when the time limit passed before any plan was found."""
    start = time.perf_counter()
    capability.check_pins(pins)
    pairs = candidate_pairs(graph, cluster, training, capability, pins)
    # One bar for the whole search: pricing each subproblem (tables, bound, uniform plan), then solving it.
    bar = tqdm(
        total=2 * len(pairs),
        desc="pricing",
        unit="subproblem",
        disable=progress is False if progress is not None else None,
        leave=False,
    )
    try:
        subs, bounds, uniform, tables = [], {}, {}, {}
        for d, c, v in pairs:
            # Many chunks per rank: the layers split as Megatron fixes them (FREE_SPLIT_VIRTUAL_STAGES). The run
            # tables do not depend on v: priced once per (deg, c).
            sub = build_subproblem(
                graph,
                cluster,
                training,
                capability,
                cost_model,
                d,
                c,
                pins,
                v,
                v > FREE_SPLIT_VIRTUAL_STAGES,
                tables.get((d, c)),
            )
            tables[(d, c)] = sub.runs
            bounds[id(sub)] = sub.lower_bound()
            # The best uniform plan of each subproblem: a first incumbent and the order of the search.
            uniform[id(sub)] = best_uniform_plan(sub)
            subs.append(sub)
            bar.update(1)
        bar.set_description("solving")
        upper = {k: (v[0].time_per_iteration if v else float("inf")) for k, v in uniform.items()}
        subs.sort(key=lambda s: (upper[id(s)], bounds[id(s)]))
        results: list[SubproblemResult] = []
        best: tuple[SubproblemResult, Subproblem] | None = None
        if subs and uniform[id(subs[0])]:
            pred, stage_of, strategy_of = uniform[id(subs[0])]
            best = (
                SubproblemResult.of(
                    subs[0],
                    "heuristic",
                    objective=pred.time_per_iteration,
                    stage_of=stage_of,
                    strategy_of=strategy_of,
                ),
                subs[0],
            )
        for sub in subs:
            incumbent = best[0].objective if best else None
            remaining = None if time_limit is None else time_limit - (time.perf_counter() - start)
            if not sub.feasible_strategies:
                result = SubproblemResult.of(sub, "no_strategy")
            elif bounds[id(sub)] == float("inf"):
                result = SubproblemResult.of(sub, "infeasible")  # the memory bound alone rules it out
            elif best is not None and best[1] is sub and bounds[id(sub)] >= incumbent * (1 - SAME_OBJECTIVE):
                # This subproblem's uniform plan meets its lower bound: it is the subproblem's optimum.
                result = SubproblemResult.of(
                    sub,
                    "optimal",
                    objective=incumbent,
                    bound=bounds[id(sub)],
                    gap=0.0,
                    stage_of=best[0].stage_of,
                    strategy_of=best[0].strategy_of,
                )
                best = (result, sub)
            elif incumbent is not None and bounds[id(sub)] >= incumbent:
                result = SubproblemResult.of(sub, "pruned", bound=bounds[id(sub)])
            elif remaining is not None and remaining <= 0:
                result = SubproblemResult.of(sub, "not_solved", bound=bounds[id(sub)])
            else:
                # Tied combinations that cannot beat the incumbent leave the MIQP (Subproblem.restricted).
                narrowed = sub if incumbent is None else sub.restricted(incumbent)
                result = solve_subproblem(narrowed, time_limit=remaining, gap=gap, cutoff=incumbent)
                if result.status == "pruned" and best[1] is sub:
                    # Nothing beats this subproblem's own uniform plan: that plan is its optimum.
                    result = SubproblemResult.of(
                        sub,
                        "optimal",
                        objective=incumbent,
                        bound=incumbent,
                        gap=0.0,
                        solve_seconds=result.solve_seconds,
                        stage_of=best[0].stage_of,
                        strategy_of=best[0].strategy_of,
                    )
                if result.objective is not None and (incumbent is None or result.objective <= incumbent):
                    best = (result, sub)
            results.append(result)
            bar.update(1)
            if best:
                bar.set_postfix_str(f"best {best[0].objective:.3f} s/iter (pp{best[1].deg}, c{best[1].c})")
            log.debug("deg=%d v=%d c=%d %s %s", sub.deg, sub.v, sub.c, result.status, result.objective)
    finally:
        bar.close()  # also on Ctrl-C: the terminal line is left clean
    elapsed = time.perf_counter() - start
    if best is None:
        if any(r.status in ("time_limit", "not_solved") for r in results):
            raise SolverTimeLimitError(
                f"the solver reached the time limit ({time_limit:g} s) before finding any plan", "raise --time-limit"
            )
        raise _infeasible(subs, cluster, capability, training)
    result, sub = best
    # The evaluator prices the chosen assignment exactly; the MIQP's value can exceed it only by slack
    # left in auxiliary variables when SCIP stops at the gap limit.
    prediction = evaluate(sub, result.stage_of, result.strategy_of)
    lower = min([prediction.time_per_iteration] + [_bound(r) for r in results])
    global_gap = max(0.0, (prediction.time_per_iteration - lower) / prediction.time_per_iteration)
    open_ = any(r.status in ("time_limit", "not_solved") for r in results)
    status = "time_limit" if open_ or global_gap > gap + SOLVER_GAP else "optimal"
    return Outcome(
        best=result,
        sub=sub,
        prediction=prediction,
        results=results,
        status=status,
        gap=global_gap,
        seconds=elapsed,
        lower_bound=lower,
    )


def _bound(r: SubproblemResult) -> float:
    """What a subproblem proves about the optimum: +inf when it has no plan."""
    if r.status in ("infeasible", "no_strategy"):
        return float("inf")
    if r.status == "optimal":
        return r.bound if r.bound is not None else r.objective
    return r.bound if r.bound is not None else 0.0


def _infeasible(
    subs: list[Subproblem], cluster: ClusterSpec, capability: Capability, training: TrainingSpec
) -> InfeasibleError:
    """The least memory any candidate needs, and what would make a plan fit."""
    usable = subs[0].usable_memory if subs else cluster.usable_memory_bytes
    margin = subs[0].cost_model.memory_margin if subs else 0.0
    kept = f", less {margin:.0%} kept free while the allocator ratio is estimated" if margin else ""
    with_strategies = [s for s in subs if s.feasible_strategies]
    if not with_strategies:
        return InfeasibleError(
            "no strategy is available for every layer under these settings (the global "
            "batch must split into micro-batches divisible by the data-parallel degree, "
            "and pinned choices must be runnable on the target)",
            "change the global batch size, the GPU count or the pinned choices",
        )
    least = None
    for sub in sorted(with_strategies, key=lambda s: s.least_memory()):
        if least is not None and sub.least_memory() >= least[0]:
            break
        need = least_memory_needed(sub, time_limit=30)
        if need is not None and (least is None or need < least[0]):
            least = (need, sub)
    hints = ["more GPUs (--nodes / --gpus-per-node)"]
    if "full" in capability.recompute_modes:
        hints.append("activation recompute is already considered; a shorter --seq-length")
    else:
        hints.append(f"a target with activation recompute (target '{capability.name}' has none)")
    if 3 not in capability.zero_stages:
        hints.append(f"a target with ZeRO-3/FSDP (target '{capability.name}' has none)")
    if len(capability.offload_modes) > 1 and cluster.host_memory_gib is None:
        hints.append(
            "host_memory_gib in the cluster file, so that offloading model states to host memory is considered"
        )
    hints.append("a smaller --global-batch-size (smaller micro-batches)")
    usable_gib = usable / GiB
    if least is None:
        return InfeasibleError(
            f"no plan fits in {usable_gib:.1f} GiB usable per GPU "
            f"({cluster.gpu_memory_gib:g} GiB minus {cluster.reserved_memory_gib:g} reserved{kept})",
            "; ".join(hints),
        )
    need, sub = least
    return InfeasibleError(
        f"no plan fits in {usable_gib:.1f} GiB usable per GPU ({cluster.gpu_memory_gib:g} GiB minus "
        f"{cluster.reserved_memory_gib:g} reserved{kept}); the leanest candidate needs {need / GiB:.1f} GiB on its "
        f"fullest stage (pipeline degree {sub.deg}, {sub.c} micro-batch(es) of {sub.micro_batch_all_replicas} samples"
        " over all replicas)",
        "; ".join(hints),
    )
