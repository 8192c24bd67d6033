"""The MIQP's optimum equals an independent exhaustive search over plans, on random small instances."""

from __future__ import annotations

import itertools

import pytest
from sweep import sampled

from random_instances import random_instance
from uniap.cost.evaluate import check_assignment, evaluate
from uniap.cost.strategy import NO_PINS
from uniap.cost.tables import build_subproblem
from uniap.errors import InfeasibleError, SpecError
from uniap.solver.uop import candidate_pairs, optimize
from uniap.solver.exhaustive import exhaustive_optimum, placements
from uniap.solver.heuristic import best_uniform_plan
from uniap.solver.miqp import least_memory_needed, solve_subproblem

SEEDS = range(64)
REL = 2e-4  # the solver's relative gap is 1e-4


@pytest.mark.parametrize("seed", sampled(SEEDS, 8))
def test_miqp_matches_exhaustive_search(seed):
    sub, what = random_instance(seed)
    expected = exhaustive_optimum(sub)
    result = solve_subproblem(sub)
    uniform = best_uniform_plan(sub)
    if expected is None:
        assert result.objective is None and result.status in ("infeasible", "no_strategy"), what
        assert uniform is None, what
        return
    # The UOP prunes with the lower bound and starts from the uniform plan: both must be valid.
    assert sub.lower_bound() <= expected[0] * (1 + 1e-9), what
    if uniform is not None:
        assert uniform[0].time_per_iteration >= expected[0] * (1 - 1e-9), what
    cut = solve_subproblem(sub, cutoff=expected[0])
    assert cut.status == "optimal" and cut.objective == pytest.approx(expected[0], rel=REL), what
    assert solve_subproblem(sub, cutoff=expected[0] * 0.99).status == "pruned", what
    assert result.status == "optimal", what
    assert result.objective == pytest.approx(expected[0], rel=REL), what
    pred = evaluate(sub, result.stage_of, result.strategy_of)
    assert pred.fits, what
    assert pred.time_per_iteration == pytest.approx(expected[0], rel=REL), what


@pytest.mark.slow
def test_instances_cover_feasible_infeasible_and_pipelines():
    kinds = set()
    for seed in SEEDS:
        sub, _ = random_instance(seed)
        kinds.add(("deg>1" if sub.deg > 1 else "deg=1", exhaustive_optimum(sub) is None))
    assert ("deg>1", False) in kinds and ("deg=1", False) in kinds
    assert any(infeasible for _, infeasible in kinds)


@pytest.mark.parametrize("seed", range(0, 64, 8))
def test_least_memory_needed_matches_exhaustive(seed):
    sub, what = random_instance(seed)
    g = sub.graph
    options = [sub.runs[g.run_of[u]].strategies for u in range(len(g.layers))]
    best = None
    for stage_of in placements(sub):
        for strategy_of in itertools.product(*options):
            try:
                check_assignment(sub, stage_of, list(strategy_of))
            except SpecError:
                continue
            peak = max(evaluate(sub, stage_of, list(strategy_of)).stage_memory)
            best = peak if best is None else min(best, peak)
    got = least_memory_needed(sub)
    if best is None:
        assert got is None, what
    else:
        assert got == pytest.approx(best, rel=1e-4), what


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_unified_optimization_matches_exhaustive_over_all_subproblems(seed):
    """The UOP (bounds, pruning, uniform-plan incumbent, cutoffs) finds the best plan over every
    (pipeline degree, micro-batch count), as exhaustive search over all of them does."""
    sub, what = random_instance(seed)
    graph, cluster, training, cap, cm = sub.graph, sub.cluster, sub.training, sub.capability, sub.cost_model
    best = None
    for deg, c, v in candidate_pairs(graph, cluster, training, cap, NO_PINS):
        found = exhaustive_optimum(build_subproblem(graph, cluster, training, cap, cm, deg, c, v=v))
        if found and (best is None or found[0] < best):
            best = found[0]
    if best is None:
        with pytest.raises(InfeasibleError):
            optimize(graph, cluster, training, cap, cm, progress=False)
        return
    outcome = optimize(graph, cluster, training, cap, cm, progress=False)
    assert outcome.status == "optimal", what
    assert outcome.prediction.time_per_iteration == pytest.approx(best, rel=REL), what


def test_constraints_are_grouped_by_family():
    """Each method of the formulation adds one family, and the problem is exactly their union (so a subproblem
    can be examined family by family)."""
    from uniap.cluster.spec import cluster_preset
    from uniap.cost.model import CostModel
    from uniap.cost.strategy import GENERIC
    from uniap.model import TrainingSpec, build_graph, model_preset
    from uniap.solver.miqp import COMMUNICATION, FAMILIES, MEMORY, OBJECTIVE, ORDER, PLACEMENT, _Formulation

    training = TrainingSpec(global_batch_size=8, seq_length=1024)
    cluster = cluster_preset("dgx-a100-80g").with_shape(1, 2)
    graph = build_graph(model_preset("gpt3-1.3b"), training)
    sub = build_subproblem(graph, cluster, training, GENERIC, CostModel(cluster, training), 2, 4)
    form = _Formulation(sub)
    problem = form.build()
    assert list(form.families) == list(FAMILIES)
    # one GPU per stage: a single layout, so no strategy-selection or resharding constraints here
    assert all(form.families[f] for f in (PLACEMENT, ORDER, COMMUNICATION, MEMORY, OBJECTIVE))
    assert problem.constraints == [c for f in FAMILIES for c in form.families[f]]
