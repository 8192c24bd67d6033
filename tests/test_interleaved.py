"""Interleaved 1F1B (model chunks per pipeline rank) in the search: its time and memory, the MIQP against
exhaustive search, pins, and plans that use it."""

from __future__ import annotations

import json

import pytest

from random_instances import random_graph
from uniap.cluster.spec import load_cluster
from uniap.cost.evaluate import pipeline_time
from uniap.cost.model import CostModel
from uniap.cost.strategy import Pins, capability_for
from uniap.cost.tables import build_subproblem, inflight_microbatches
from uniap.errors import SpecError
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import TrainingSpec
from uniap.plan import Plan
from uniap.planner import Job, plan
from uniap.model.spec import training_spec
from uniap.solver.exhaustive import exhaustive_optimum
from uniap.solver.miqp import solve_subproblem

LLAMA2_7B = MODEL_PRESETS["llama2-7b"]


def test_equal_chunks_shrink_the_bubble_by_v():
    """4 ranks, 8 micro-batches, a rank's work 1 s: 1F1B takes (c + deg - 1) s; two equal chunks per rank take
    c + (deg - 1)/2 (Narayanan et al. 2021)."""
    assert pipeline_time([1.0] * 4, [0.0] * 3, [0.0] * 4, 8) == pytest.approx(11.0)
    assert pipeline_time([0.5] * 8, [0.0] * 7, [0.0] * 8, 8, deg=4) == pytest.approx(9.5)


def test_unequal_chunks_pay_for_the_slowest_one():
    """The same ranks' work, each rank's chunks 0.9 s and 0.1 s: the fill and drain run at the slow chunk."""
    chunks = [0.9] * 4 + [0.1] * 4
    assert pipeline_time(chunks, [0.0] * 7, [0.0] * 8, 8, deg=4) == pytest.approx(8 + 3 * 0.9)


def test_in_flight_activations_follow_megatrons_warm_up():
    """Megatron's interleaved warm-up: rank r holds (deg - r - 1) * 2 + (v - 1) * deg + 1 chunk micro-batches;
    the first rank's deg + (deg - 1)/v of a rank's activations (Korthikanti et al. 2022)."""
    got = inflight_microbatches(4, 8, 2)
    assert got[0] == got[4] == pytest.approx(4 + 3 / 2)
    assert got[3] == pytest.approx((4 + 1) / 2)
    assert inflight_microbatches(4, 8, 1) == [4, 3, 2, 1]
    assert inflight_microbatches(4, 2, 2)[0] == pytest.approx(2)  # capped by the c * v chunk micro-batches


@pytest.mark.parametrize("seed", [1, 5, 9])
def test_miqp_matches_exhaustive_search_interleaved(seed):
    import random

    graph = random_graph(random.Random(seed), "run")
    cluster = load_cluster("dgx-a100-80g", 1, 2)
    training = TrainingSpec(global_batch_size=8, seq_length=512)
    sub = build_subproblem(
        graph, cluster, training, capability_for("megatron"), CostModel(cluster, training), 2, 2, v=2
    )
    if sub.stages > len(graph.layers):
        pytest.skip("too few layers for 4 chunks")
    expected = exhaustive_optimum(sub)
    result = solve_subproblem(sub)
    if expected is None:
        assert result.objective is None
        return
    assert sub.lower_bound() <= expected[0] * (1 + 1e-9)
    assert result.status == "optimal" and result.objective == pytest.approx(expected[0], rel=2e-4)


def _job(target: str = "megatron", nodes: int = 1, **pins) -> Job:
    cluster = load_cluster("dgx-a100-80g", nodes)
    return Job(
        model=LLAMA2_7B, cluster=cluster, training=training_spec(LLAMA2_7B, 64), target=target, pins=Pins(**pins)
    )


def test_a_pinned_chunk_count_is_honoured_with_an_even_split():
    made = plan(_job(pipeline_degree=4, virtual_stages=2, even_split=True), progress=False)[0]
    assert (made.pipeline_degree, made.virtual_stages, made.num_stages) == (4, 2, 8)
    assert made.stage_layer_counts() == [4] * 8
    assert made.micro_batches % 4 == 0  # Megatron's interleaved schedule needs it
    assert Plan.from_dict(json.loads(made.to_json())) == made
    # each rank's memory is the same on all of its chunks
    assert [s.memory_bytes for s in made.stages[:4]] == [s.memory_bytes for s in made.stages[4:]]


def test_targets_without_interleaving_refuse_the_pin():
    with pytest.raises(SpecError, match="cannot run the pinned 2 model chunks per pipeline rank"):
        plan(_job("deepspeed", virtual_stages=2), progress=False)


def test_interleaving_without_a_pipeline_is_refused():
    with pytest.raises(SpecError, match="--virtual-stages 2 interleaves model chunks over pipeline ranks, but --pp"):
        plan(_job(pipeline_degree=1, virtual_stages=2), progress=False)
