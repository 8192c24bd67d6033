"""Issue 12, item 4: DeepSpeed's wider ZeRO space (CPU offload of the optimizer and the parameters, ZeRO++) priced,
chosen when it pays or when nothing else fits, said so, and emitted as configs DeepSpeed runs."""

from __future__ import annotations

import json

import pytest
from test_deepspeed import accepted_by_deepspeed, ds_world, run_ds_train, tiny_yaml  # noqa: F401 (fixture)

from uniap.cluster.spec import GiB, HOST_MEMORY_USABLE, load_cluster
from uniap.cost.model import CostModel
from uniap.cost.strategy import GENERIC, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, Strategy, stage_strategies
from uniap.errors import InfeasibleError, SpecError
from uniap.explain import explain, render_explanation
from uniap.model.graph import build_graph
from uniap.model.presets import model_preset
from uniap.plan import Plan
from uniap.model.spec import training_spec
from uniap_deepspeed.capability import DEEPSPEED
from uniap_deepspeed.config import deepspeed_config, plan_for_deepspeed

# Llama-2-7B does not fit one 80 GB GPU with its Adam states (16 bytes per parameter): offloading is the only way.
ONE_GPU = dict(cluster="dgx-h100", gpus_per_node=1, global_batch_size=16, seq_length=2048)


def test_strategies_refuse_variants_zero_cannot_run():
    assert Strategy(1, 1, 2, offload=OFFLOAD_OPTIMIZER).label == "ZeRO-2 +offload"
    assert Strategy(1, 8, 3, "full", offload=OFFLOAD_PARAMS).label == "DP8 FSDP +offload(params) +rc"
    assert Strategy(1, 16, 3, zeropp=True).label == "DP16 ZeRO++"
    for bad, words in (
        (dict(zero=0, offload=OFFLOAD_OPTIMIZER), "needs a ZeRO stage"),
        (dict(zero=2, offload=OFFLOAD_PARAMS), "parameters needs ZeRO stage 3"),
        (dict(zero=2, zeropp=True), r"ZeRO\+\+ is ZeRO-3"),
        (dict(zero=3, zeropp=True, offload=OFFLOAD_OPTIMIZER), "alternatives"),
        (dict(zero=1, offload="nvme"), "invalid strategy: offload 'nvme'"),
    ):
        with pytest.raises(SpecError, match=words):
            Strategy(1, 8, **bad)
    with pytest.raises(SpecError, match="needs data parallelism"):
        Strategy(1, 1, 2)  # one replica and nothing offloaded: ZeRO has nothing to do


def _layer_costs(zero: int, offload: str, dp: int = 8):
    model = model_preset("llama2-7b")
    cluster = load_cluster("dgx-h100")
    training = training_spec(model, 64, 2048)
    layer = next(x for x in build_graph(model, training).layers if x.kind == "transformer")
    cost = CostModel(cluster, training).layer_cost(
        layer, Strategy(1, dp, zero, offload=offload), 8, 1, True, DEEPSPEED.accounting
    )
    return layer.params_tp + layer.params_rep, cost


@pytest.mark.parametrize(
    ("zero", "offload", "device", "host"),
    [(1, OFFLOAD_OPTIMIZER, 4.0, 18 / 8), (2, OFFLOAD_OPTIMIZER, 2.0, 20 / 8), (3, OFFLOAD_OPTIMIZER, 2 / 8, 18 / 8)]
    + [(3, OFFLOAD_PARAMS, 0.0, 20 / 8)],
)
def test_offloaded_states_are_what_deepspeed_keeps_where(zero, offload, device, host):
    """bf16 bytes per parameter on the GPU and on the host, as uniap_deepspeed/capability.py reads them from
    DeepSpeed 0.19.8's stage_1_and_2.py and stage3.py, over 8 ranks."""
    params, cost = _layer_costs(zero, offload)
    assert cost.state_bytes == pytest.approx(device * params)
    assert cost.host_bytes == pytest.approx(host * params)
    off = DEEPSPEED.accounting.offload("bf16", zero, offload)
    assert cost.step_bytes == pytest.approx(off.at_step.at(8) * params)  # the step itself runs on the host
    _, plain = _layer_costs(zero, "none")
    assert plain.host_bytes == 0 and plain.state_bytes > cost.state_bytes
    # The CPU's step is slower than the GPU's, and the host link carries the gradients and weights.
    assert cost.time_per_iteration > plain.time_per_iteration


def test_only_targets_that_offload_are_offered_it_and_only_where_the_hosts_are_described():
    args = (8, 8, 8, 1)
    divisibility = {"sequence_length": 2048, "num_attention_heads": 32, "num_query_groups": 32, "ffn_hidden_size": 64}
    kw = dict(kind="transformer", divisibility=divisibility, flash_attention=True)
    ds = stage_strategies(*args, DEEPSPEED, host=True, **kw)
    assert {s.offload for s in ds} == {"none", OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS}
    assert not any(s.zeropp for s in ds)  # one node: ZeRO++'s secondary partition would be the primary
    assert {s.offload for s in stage_strategies(*args, DEEPSPEED, host=False, **kw)} == {"none"}
    assert {s.offload for s in stage_strategies(*args, GENERIC, host=True, **kw)} == {"none"}
    two_nodes = stage_strategies(16, 8, 16, 1, DEEPSPEED, host=False, **kw)
    assert any(s.zeropp and s.zero == 3 for s in two_nodes)


@pytest.mark.usefixtures("ds_world")
def test_a_model_too_big_for_one_gpu_is_offloaded_and_the_plan_says_why():
    plan = plan_for_deepspeed("llama2-7b", **ONE_GPU)
    s = plan.uniform_strategy
    assert s.offload in (OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS) and s.zero >= 1
    assert any("no plan without offloading or ZeRO++ fits" in note for note in plan.notes)
    host = max(stage.host_bytes for stage in plan.stages)
    assert 0 < host <= load_cluster("dgx-h100").host_memory_per_gpu_bytes
    config = deepspeed_config(plan)
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["uniap"]["zero"].endswith("+offload") or "offload(params)" in config["uniap"]["zero"]
    accepted_by_deepspeed(config, 1)
    again = Plan.from_dict(json.loads(plan.to_json()))  # version 5 keeps the variant and the host memory
    assert again.uniform_strategy == s and again.notes == plan.notes and again.stages == plan.stages
    text = render_explanation(explain(plan))
    assert "host memory per GPU (offloaded states and activations)" in text and "note: ZeRO-" in text


def test_host_memory_bounds_offloading(tmp_path):
    """Offloaded states must fit the hosts: 7B x 18 bytes does not fit 64 GiB; a cluster that does not describe
    its hosts is not offloaded to, and the refusal says which field to add."""
    cluster = load_cluster("dgx-h100").to_dict()
    small = tmp_path / "small-host.json"
    small.write_text(json.dumps({**cluster, "host_memory_gib": 64.0}))
    with pytest.raises(InfeasibleError):
        plan_for_deepspeed("llama2-7b", **{**ONE_GPU, "cluster": str(small)})
    unknown = tmp_path / "no-host.json"
    unknown.write_text(json.dumps({k: v for k, v in cluster.items() if k != "host_memory_gib"}))
    with pytest.raises(InfeasibleError) as info:
        plan_for_deepspeed("llama2-7b", **{**ONE_GPU, "cluster": str(unknown)})
    assert "host_memory_gib in the cluster file" in str(info.value)
    assert load_cluster(str(small)).host_memory_per_gpu_bytes == 64.0 * HOST_MEMORY_USABLE * GiB / 8


def test_pins_decide_offloading(tmp_path):
    with pytest.raises(InfeasibleError):
        plan_for_deepspeed("llama2-7b", **ONE_GPU, offload="none")
    for zero, offload in ((0, OFFLOAD_OPTIMIZER), (2, OFFLOAD_PARAMS)):
        with pytest.raises(SpecError, match=f"offloading the {offload} needs ZeRO stage"):
            plan_for_deepspeed("llama2-7b", **ONE_GPU, zero_stage=zero, offload=offload)
    no_host = tmp_path / "no-host.json"
    no_host.write_text(json.dumps({**load_cluster("dgx-h100").to_dict(), "host_memory_gib": None}))
    with pytest.raises(SpecError, match="does not describe its hosts"):
        plan_for_deepspeed("llama2-7b", **{**ONE_GPU, "cluster": str(no_host)}, offload=OFFLOAD_OPTIMIZER)
    plan = plan_for_deepspeed("llama2-7b", **ONE_GPU, offload=OFFLOAD_PARAMS)
    assert plan.uniform_strategy.offload == OFFLOAD_PARAMS and plan.uniform_strategy.zero == 3
    assert plan.notes == ["ZeRO-3 +offload(params): offloading was pinned"]
    assert "offload_param" in deepspeed_config(plan)["zero_optimization"]


@pytest.mark.usefixtures("ds_world")
def test_zeropp_across_nodes_is_chosen_when_it_pays_and_emitted_for_deepspeed():
    """Llama-2-70B on 8 DGX H100s: ZeRO-3's all-gathers cross the 50 GB/s network; ZeRO++ halves the forward's,
    keeps backward's inside the node and quarters the gradients'."""
    plan = plan_for_deepspeed("llama2-70b", cluster="dgx-h100", nodes=8, global_batch_size=512, seq_length=4096)
    assert plan.uniform_strategy.zeropp
    note = plan.notes[0]
    assert "ZeRO++ chosen" in note and "faster than the best plan without offloading or ZeRO++" in note
    zero = deepspeed_config(plan)["zero_optimization"]
    assert (zero["zero_quantized_weights"], zero["zero_hpz_partition_size"], zero["zero_quantized_gradients"]) == (
        True,
        8,
        True,
    )
    accepted_by_deepspeed(deepspeed_config(plan), 64)


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "offload"), [(2, OFFLOAD_OPTIMIZER), (3, OFFLOAD_PARAMS)])
def test_real_training_with_offloaded_states(tmp_path, zero, offload):
    """The emitted config trains on 2 CPU ranks with DeepSpeed's offload code paths (gradients copied to host
    buffers, the step on the host partition, weights copied back). The base's optimizer asks for torch's AdamW
    (torch_adam), so the run does not JIT-build DeepSpeedCPUAdam (minutes); the emitted default uses it."""
    from uniap_deepspeed import plan_config

    base = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}}}
    config = plan_config(
        str(tiny_yaml(tmp_path)),
        base=base,
        cluster="dgx-a100-80g",
        gpus_per_node=2,
        global_batch_size=8,
        seq_length=16,
        precision="bf16",
        zero_stage=zero,
        pipeline_stages=1,
        offload=offload,
    )
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    reports = run_ds_train(tmp_path, "--config", str(path), "--mode", "plain", "--steps", "6")
    for r in reports:
        assert r["zero_stage"] == zero and r["basic_optimizer"] == "AdamW"
        assert r["offload_optimizer"] and r["offload_param"] == (offload == OFFLOAD_PARAMS)
        assert r["finite"] and r["losses"][-1] < r["losses"][0]
