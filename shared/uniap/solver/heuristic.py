"""The best uniform plan of a subproblem: one strategy for every layer (as far as each layer has it)
and the even split. A valid plan, so its time is an upper bound: the UOP uses it as the first
incumbent, to order subproblems and as the cutoff that lets SCIP discard a subproblem at its root."""

from __future__ import annotations

from ..cost.evaluate import Prediction, evaluate, even_split, split_by_counts
from ..cost.strategy import Strategy
from ..cost.tables import Subproblem
from ..errors import SpecError
from ..tolerances import MEMORY_FIT


def best_uniform_plan(sub: Subproblem) -> tuple[Prediction, list[int], list[Strategy]] | None:
    """The fastest fitting plan where all layers share (tp, cp, zero, recompute) where they can, or None."""
    if not sub.feasible_strategies:
        return None
    g = sub.graph
    try:
        stage_of = split_by_counts(g, list(sub.split_counts)) if sub.split_counts else even_split(g, sub.stages)
    except SpecError:
        return None
    main = max(sub.runs, key=lambda rt: rt.run.size)
    # Stage 0's rank holds at least its share of the main run, at stage 0's in-flight count: a choice whose
    # share alone exceeds the budget cannot fit (a quick test before pricing the plan).
    share = sum(1 for u in range(main.run.first, main.run.last + 1) if sub.rank_of(stage_of[u]) == 0)
    budget = sub.memory_capacity * (1 + MEMORY_FIT)
    best, seen = None, set()
    for choice, cost in zip(main.strategies, main.costs):
        if share * (cost.state_bytes + sub.inflight[0] * cost.activation_bytes) > budget:
            continue
        per_run = tuple(_closest(rt.strategies, choice) for rt in sub.runs)  # layers of a run are alike
        if None in per_run or per_run in seen:
            continue
        seen.add(per_run)
        strategy_of = [per_run[g.run_of[u]] for u in range(len(g.layers))]
        try:
            pred = evaluate(sub, stage_of, strategy_of)
        except SpecError:
            continue
        if pred.fits and (best is None or pred.time_per_iteration < best[0].time_per_iteration):
            best = (pred, stage_of, strategy_of)
    return best


def _closest(options: list[Strategy], want: Strategy) -> Strategy | None:
    """`want` itself, else the same TP, CP and ZeRO without recompute, else the same TP and CP."""
    for ok in (
        lambda s: s == want,
        lambda s: (s.tp, s.cp, s.zero, s.recompute) == (want.tp, want.cp, want.zero, "none"),
        lambda s: (s.tp, s.cp) == (want.tp, want.cp),
    ):
        for s in options:
            if ok(s):
                return s
    return None
