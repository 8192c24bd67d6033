"""What large jobs run, priced as the frameworks run it (issue 20): FP8 and FP4 GEMMs, TP-communication and
param-gather overlap, gradients reduced in fp32 or bf16, hierarchical collectives across nodes, context
parallelism's short blocks, Megatron's many-chunk splits, the memory margin, and the flags that carry them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from uniap.cluster.spec import CLUSTER_PRESETS
from uniap.cost.model import ESTIMATED_MEMORY_MARGIN, CostModel, ring_slowdown
from uniap.cost.strategy import GENERIC, Strategy, capability_for
from uniap.cost.tables import fixed_counts
from uniap.errors import SpecError
from uniap.model.graph import build_graph
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import PARAM_GATHER_OVERLAP, TP_COMM_OVERLAP, TrainingSpec
from uniap.planner import configure

H100 = CLUSTER_PRESETS["dgx-h100"]
LLAMA3_8B = MODEL_PRESETS["llama3-8b"]


def _layer_costs(training: TrainingSpec, cluster=H100, tp: int = 1, target: str = "megatron"):
    """(transformer layer cost, head cost) of Llama-3-8B at TP `tp` on one node's data-parallel stage."""
    capability = capability_for(target)
    training = capability.job_training(training)
    graph = build_graph(LLAMA3_8B, training)
    model = CostModel(cluster, training, vocab_multiple=capability.vocab_multiple)
    s = Strategy(tp=tp, dp=8 // tp, zero=1 if tp < 8 else 0)
    layer, head = graph.layers[1], graph.layers[-1]
    cost = [model.layer_cost(x, s, 8 // tp, 1, True, capability.accounting) for x in (layer, head)]
    return cost[0], cost[1]


def test_training_spec_rules_for_low_precision():
    with pytest.raises(SpecError, match="fp8_recipe"):
        TrainingSpec(global_batch_size=8, seq_length=1024, fp8_recipe="fp8")
    with pytest.raises(SpecError, match="fp4_recipe"):
        TrainingSpec(global_batch_size=8, seq_length=1024, fp8_recipe="tensorwise", fp4_recipe="nvfp4")
    with pytest.raises(SpecError, match="fp8_param_gather"):
        TrainingSpec(global_batch_size=8, seq_length=1024, fp8_param_gather=True)
    with pytest.raises(SpecError, match="grad_reduce_in_bf16"):
        TrainingSpec(global_batch_size=8, seq_length=1024, precision="fp16", grad_reduce_in_bf16=True)
    with pytest.raises(SpecError, match="overlaps"):
        TrainingSpec(global_batch_size=8, seq_length=1024, overlaps=("pipeline",))
    t = TrainingSpec.from_dict({"global_batch_size": 8, "seq_length": 1024, "overlaps": ["tp_comm"]})
    assert t.overlaps == (TP_COMM_OVERLAP,) and t.to_dict()["overlaps"] == ["tp_comm"]


@pytest.mark.parametrize(
    "cluster, fields, refused",
    [
        ("dgx-a100-80g", {"fp8_recipe": "tensorwise"}, "no FP8 tensor cores"),
        ("dgx-h100", {"fp8_recipe": "mxfp8"}, "does not run on H100"),
        ("dgx-h100", {"fp4_recipe": "nvfp4"}, "no FP4 tensor cores"),
        ("dgx-b200", {"fp8_recipe": "mxfp8"}, None),
        ("gb200-nvl72", {"fp4_recipe": "nvfp4"}, None),
    ],
)
def test_a_recipe_runs_only_where_the_gpu_runs_it(cluster, fields, refused):
    training = TrainingSpec(global_batch_size=8, seq_length=1024, **fields)
    if refused:
        with pytest.raises(SpecError, match=refused):
            CostModel(CLUSTER_PRESETS[cluster], training)
    else:
        CostModel(CLUSTER_PRESETS[cluster], training)


def test_deepspeed_says_its_config_has_no_fp8():
    with pytest.raises(SpecError, match="JSON config has no FP8"):
        capability_for("deepspeed").job_training(TrainingSpec(8, 1024, fp8_recipe="tensorwise"))


def test_fp8_speeds_up_the_transformer_gemms_only_and_keeps_their_inputs_in_fp8():
    bf16_layer, bf16_head = _layer_costs(TrainingSpec(global_batch_size=8, seq_length=8192))
    fp8_layer, fp8_head = _layer_costs(TrainingSpec(global_batch_size=8, seq_length=8192, fp8_recipe="tensorwise"))
    assert fp8_layer.compute_time < 0.8 * bf16_layer.compute_time
    assert fp8_layer.activation_bytes < bf16_layer.activation_bytes
    assert fp8_layer.state_bytes > bf16_layer.state_bytes  # the two FP8 weight copies
    assert fp8_head.compute_time == pytest.approx(bf16_head.compute_time)  # the output layer stays in bf16


def test_tp_communication_overlap_hides_the_collectives_behind_the_gemms():
    plain = TrainingSpec(global_batch_size=8, seq_length=8192, overlaps=())
    overlapped = replace(plain, overlaps=(TP_COMM_OVERLAP,))
    exposed, hidden = _layer_costs(plain, tp=8)[0], _layer_costs(overlapped, tp=8)[0]
    assert hidden.time_per_microbatch < exposed.time_per_microbatch
    assert hidden.time_per_microbatch > hidden.compute_time  # the overlap coefficient's share stays


def test_megatron_reduces_gradients_in_fp32_unless_told_bf16():
    fp32 = _layer_costs(TrainingSpec(global_batch_size=8, seq_length=4096, overlaps=()))[0]
    bf16 = _layer_costs(TrainingSpec(global_batch_size=8, seq_length=4096, overlaps=(), grad_reduce_in_bf16=True))[0]
    assert bf16.state_bytes < fp32.state_bytes
    assert bf16.time_per_iteration < fp32.time_per_iteration


def test_a_group_across_nodes_runs_at_its_members_nics_up_to_nvlink():
    model = CostModel(H100.with_shape(8), TrainingSpec(global_batch_size=8, seq_length=1024))
    nic = H100.inter_node_bandwidth_gbps * H100.inter_node_efficiency * 1e9
    nvlink = H100.intra_node_bandwidth_gbps * H100.intra_node_efficiency * 1e9
    assert model.bus_bandwidth("all_gather", 64, False, 1) == pytest.approx(nic)
    assert model.bus_bandwidth("all_gather", 64, False, 4) == pytest.approx(4 * nic)
    assert model.bus_bandwidth("all_gather", 64, False, 8) == pytest.approx(min(8 * nic, nvlink))
    assert model.data_parallel_per_node(Strategy(tp=8, dp=8)) == 1
    assert model.data_parallel_per_node(Strategy(tp=2, dp=32)) == 4


def test_context_parallel_short_blocks_cost_what_the_h200_measured():
    assert ring_slowdown(1024) == pytest.approx(13.2, rel=0.1)
    assert ring_slowdown(2048) == pytest.approx(3.5, rel=0.1)
    assert ring_slowdown(32768) < 1.01


def test_many_chunk_splits_are_megatrons():
    assert fixed_counts(32, 8, True) == (4,) * 8
    assert fixed_counts(126, 128, True) == (0,) + (1,) * 126 + (0,)  # Llama-3.1-405B, PP16 x VP8
    assert fixed_counts(126, 64, False) is None
    assert fixed_counts(30, 8, True) == (3,) + (4,) * 6 + (3,)
    assert fixed_counts(29, 8, True) is None


def test_the_405b_layout_bridge_runs_is_priced():
    """Llama-3.1-405B on 128 PP16 x VP8 chunks: the embedding and the loss alone on the end chunks."""
    training = TrainingSpec(global_batch_size=1536, seq_length=8192, fp8_recipe="tensorwise")
    cluster = CLUSTER_PRESETS["gb200-nvl72"].with_shape(64)
    counts = list(fixed_counts(126, 128, True))
    plan, _ = configure(
        MODEL_PRESETS["llama3.1-405b"], cluster, training, "megatron", 4, 16, 1, 1, "none", counts, virtual_stages=8
    )
    assert plan.stage_layer_counts() == counts and plan.virtual_stages == 8


def test_a_plan_keeps_a_margin_while_the_allocator_ratio_is_estimated():
    training = TrainingSpec(global_batch_size=8, seq_length=1024)
    plan, pred = configure(LLAMA3_8B, H100, training, "megatron", 1, 1, 1, 1)
    assert pred.memory_capacity == pytest.approx(H100.usable_memory_bytes * (1 - ESTIMATED_MEMORY_MARGIN))
    assert "5% of memory kept free" in plan.basis["memory"]


def test_megatron_arguments_carry_fp8_fp4_and_the_overlaps_both_ways():
    from uniap_megatron.args import job_from_args, megatron_launch, model_args

    training = TrainingSpec(
        global_batch_size=64,
        seq_length=4096,
        fp8_recipe="tensorwise",
        fp8_param_gather=True,
        grad_reduce_in_bf16=True,
    )
    plan, _ = configure(LLAMA3_8B, H100, training, "megatron", 4, 1, 1, 1)
    args = megatron_launch(plan).args
    for words in (["--fp8-format", "hybrid"], ["--fp8-recipe", "tensorwise"]):
        assert " ".join(words) in " ".join(args)
    assert {"--tp-comm-overlap", "--overlap-param-gather", "--fp8-param-gather", "--grad-reduce-in-bf16"} <= set(args)
    parsed = job_from_args(model_args(LLAMA3_8B, plan.training) + args)
    assert parsed.training.fp8_recipe == "tensorwise" and parsed.training.fp8_param_gather
    assert parsed.training.grad_reduce_in_bf16
    assert set(parsed.overlaps) == {TP_COMM_OVERLAP, PARAM_GATHER_OVERLAP}
    fp4 = TrainingSpec(global_batch_size=64, seq_length=4096, fp4_recipe="nvfp4")
    plan, _ = configure(LLAMA3_8B, CLUSTER_PRESETS["dgx-b200"], fp4, "megatron", 1, 1, 1, 1)
    args = megatron_launch(plan).args
    assert "--fp4-format e2m1 --fp4-recipe nvfp4" in " ".join(args)
    assert job_from_args(model_args(LLAMA3_8B, plan.training) + args).training.fp4_recipe == "nvfp4"


def test_generic_contains_every_overlap_a_target_runs():
    assert set(capability_for("megatron").overlaps) <= set(GENERIC.overlaps)
