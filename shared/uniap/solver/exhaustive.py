"""Exhaustive search: every order-preserving placement times every per-layer strategy, priced by
`evaluate`. Independent of the MIQP (no counts, no linearization); used to check the MIQP's optimum on
small cases and, by benchmarks, to enumerate what a target framework can express."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..cost.evaluate import Prediction, check_assignment, evaluate
from ..cost.strategy import Strategy
from ..cost.tables import Subproblem
from ..errors import SpecError


def placements(sub: Subproblem) -> Iterator[list[int]]:
    """All stage assignments where every edge goes forward or stays, and no stage is empty."""
    g, deg = sub.graph, sub.stages
    preds = [[e.src for e in g.pred(v)] for v in range(len(g.layers))]

    def rec(v: int, stage_of: list[int]) -> Iterator[list[int]]:
        if v == len(g.layers):
            if len(set(stage_of)) == deg:
                yield list(stage_of)
            return
        low = max((stage_of[u] for u in preds[v]), default=0)
        for s in range(low, deg):
            stage_of.append(s)
            yield from rec(v + 1, stage_of)
            stage_of.pop()

    yield from rec(0, [])


def assignments(sub: Subproblem) -> Iterator[list[Strategy]]:
    """Per-layer strategies to try: every product of the layers' strategies within one combination of the
    values all layers must share (`Subproblem.tie_groups`; a plan outside them breaks a tie, which
    `check_assignment` refuses anyway). A plan may be produced by more than one combination."""
    g = sub.graph
    for masks in sub.tie_groups():
        allowed = [[s for s, ok in zip(rt.strategies, m) if ok] for rt, m in zip(sub.runs, masks)]
        yield from (list(x) for x in itertools.product(*(allowed[g.run_of[u]] for u in range(len(g.layers)))))


def exhaustive_optimum(sub: Subproblem) -> tuple[float, list[int], list[Strategy], Prediction] | None:
    """The best plan that fits in memory, or None when none does."""
    best = None
    for stage_of in placements(sub):
        for strategy_of in assignments(sub):
            try:
                check_assignment(sub, stage_of, strategy_of)
            except SpecError:
                continue
            pred = evaluate(sub, stage_of, strategy_of)
            if pred.fits and (best is None or pred.time_per_iteration < best[0]):
                best = (pred.time_per_iteration, stage_of, strategy_of, pred)
    return best
