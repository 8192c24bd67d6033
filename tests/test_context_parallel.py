"""Context parallelism in the search: what CP costs and saves, its rules, pins, and the plans that use it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from uniap.cli import main
from uniap.cluster.spec import load_cluster
from uniap.cost.model import CostModel
from uniap.cost.strategy import Pins, Strategy, capability_for, cp_fits_sequence
from uniap.errors import SpecError
from uniap.model.graph import TRANSFORMER, build_graph
from uniap.model.presets import MODEL_PRESETS
from uniap.plan import Plan
from uniap.planner import Job, configure, plan
from uniap.model.spec import training_spec

# Llama-3.1-8B: Llama-3-8B's shape with 128k positions.
LLAMA3_8B = replace(MODEL_PRESETS["llama3-8b"], name="llama3.1-8b", max_position_embeddings=131072)


def _layer_and_model(seq: int, nodes: int = 1):
    cluster = load_cluster("dgx-a100-80g", nodes=nodes)
    training = training_spec(LLAMA3_8B, 64, seq_length=seq)
    graph = build_graph(LLAMA3_8B, training)
    layer = next(layer for layer in graph.layers if layer.kind == TRANSFORMER)
    return layer, CostModel(cluster, training), capability_for("megatron").accounting


def test_cp_splits_tokens_and_shards_states_over_dp_times_cp():
    """CP 2 with the same DP: each rank computes and keeps half the tokens' activations, ZeRO-1 shards the
    optimizer over DP x CP, and the ring's exchange adds time (overlapped, not free)."""
    layer, model, accounting = _layer_and_model(32768)
    one = model.layer_cost(layer, Strategy(tp=1, dp=2, zero=1), 2, 1, True, accounting)
    two = model.layer_cost(layer, Strategy(tp=1, dp=2, zero=1, cp=2), 2, 1, True, accounting)
    assert two.activation_bytes == pytest.approx(one.activation_bytes / 2)
    assert two.state_bytes < one.state_bytes  # the optimizer's part split four ways instead of two
    assert one.time_per_microbatch / 2 < two.time_per_microbatch < one.time_per_microbatch


def test_ring_exchange_is_dearer_across_nodes():
    """The CP ranks sit next to each other after TP: a ring that leaves the node pays the slower link."""
    layer, model, _ = _layer_and_model(8192, nodes=2)
    inside = model.context_parallel_exposed(layer, Strategy(tp=2, dp=1, cp=4), 1 / 4)
    across = model.context_parallel_exposed(layer, Strategy(tp=2, dp=1, cp=8), 1 / 4)
    assert 0 < inside < across
    assert model.context_parallel_exposed(layer, Strategy(tp=2, dp=4), 1.0) == 0.0


@pytest.mark.parametrize(
    "cp, tp, ok",
    [(1, 1, True), (2, 1, True), (3, 1, False), (4, 8, True), (8, 64, True), (8, 3, False), (2048, 1, True)],
)
def test_cp_sequence_rules(cp, tp, ok):
    """Megatron-LM validate_args: seq % (2 CP) == 0; sequence parallelism: (seq / CP) % TP == 0 (seq 4096)."""
    assert cp_fits_sequence(cp, tp, {"sequence_length": 4096}) is ok


def _plan(**pins) -> Plan:
    cluster = load_cluster("dgx-a100-80g", nodes=1)
    training = training_spec(LLAMA3_8B, 64, seq_length=16384)
    job = Job(model=LLAMA3_8B, cluster=cluster, training=training, target="megatron", pins=Pins(**pins))
    return plan(job, progress=False)[0]


def test_a_pinned_cp_degree_is_honoured_by_every_layer():
    made = _plan(cp=4)
    assert {lp.strategy.cp for lp in made.layers} == {4}
    assert made.context_parallel_size == 4
    assert made.data_parallel_size * 4 * made.uniform_strategy.tp * made.pipeline_degree == 8


def test_long_sequences_get_context_parallelism():
    """Llama-3-8B at 128k tokens on 32 GPUs: splitting the sequence beats every plan without it."""
    cluster = load_cluster("dgx-a100-80g", nodes=4)
    training = training_spec(LLAMA3_8B, 64, seq_length=131072)
    job = Job(model=LLAMA3_8B, cluster=cluster, training=training, target="megatron")
    made = plan(job, progress=False)[0]
    assert made.context_parallel_size > 1
    without = plan(Job(**{**job.__dict__, "pins": Pins(cp=1)}), progress=False)[0]
    assert without.time_per_iteration > made.time_per_iteration


@pytest.mark.parametrize(
    "pins, needle",
    [
        ({"cp": 3}, "--cp 3 does not split the sequence length 16384"),
        ({"cp": 3, "tp": 2}, "divisible by 2 x CP = 6"),
        ({"cp": 16}, "--cp 16 does not divide the 8 GPUs"),
        ({"cp": 2, "tp": 4, "pipeline_degree": 2}, "--pp 2 x --tp 4 x --cp 2 does not divide the 8 GPUs"),
    ],
)
def test_impossible_cp_pins_are_refused_with_the_rule(pins, needle):
    with pytest.raises(SpecError, match=needle.replace("(", r"\(")):
        _plan(**pins)


def test_a_target_without_context_parallelism_refuses_the_pin():
    cluster = load_cluster("dgx-a100-80g", nodes=1)
    training = training_spec(LLAMA3_8B, 64, seq_length=8192)
    for target in ("generic", "deepspeed"):
        job = Job(model=LLAMA3_8B, cluster=cluster, training=training, target=target, pins=Pins(cp=2))
        with pytest.raises(SpecError, match="cannot run the pinned context-parallel degree 2"):
            plan(job, progress=False)


def test_evaluate_prices_a_cp_configuration_and_the_plan_round_trips(capsys):
    cluster = load_cluster("dgx-a100-80g", nodes=1)
    training = training_spec(LLAMA3_8B, 64, seq_length=16384)
    made, pred = configure(LLAMA3_8B, cluster, training, "megatron", tp=2, cp=2, zero=1)
    assert {lp.strategy for lp in made.layers if lp.kind == TRANSFORMER} == {Strategy(2, 2, 1, "none", 2)}
    assert Plan.from_dict(json.loads(made.to_json())) == made
    rc = main(["evaluate", "--model", "llama3-8b", "--seq-length", "8192", "--global-batch-size", "64", "--target",
               "megatron", "--tp", "2", "--cp", "2", "--zero", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "TP2 CP2 DP2 ZeRO-1" in out and "context-parallel size 2" in out


def test_a_plan_saved_before_context_parallelism_reads_as_cp_1():
    cluster = load_cluster("dgx-a100-80g", nodes=1)
    made, _ = configure(LLAMA3_8B, cluster, training_spec(LLAMA3_8B, 64, seq_length=8192), "megatron", tp=2)
    data = json.loads(made.to_json())
    for lp in data["layers"]:
        del lp["strategy"]["cp"]
    assert Plan.from_dict(data).context_parallel_size == 1
