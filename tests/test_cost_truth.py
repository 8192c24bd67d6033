"""The cost model as frameworks allocate and compute: model-state bytes per target, the optimizer step's
temporaries, reserved vs allocated memory, per-GPU compute coefficients, profile interpolation, pricing saved
plans (any split) and calibration to measured runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_cli import assert_clean_error, run_main

from uniap.cluster.devices import DEVICE_COEFFICIENTS, GENERIC_DEVICE, device_coefficients
from uniap.cluster.spec import cluster_preset
from uniap.cost.accounting import FOREACH_ADAM_TEMPORARY, GENERIC_ACCOUNTING, PerParam
from uniap.cost.model import DEFAULT_RESERVED_PER_ALLOCATED, ESTIMATED_MEMORY_MARGIN, CostModel
from uniap.cost.strategy import Strategy, capability_for
from uniap.errors import ProfileError, SpecError
from uniap.model import TrainingSpec, build_graph, model_preset
from uniap.plan import Plan
from uniap.planner import configure, price
from uniap.profile import Calibration, LayerTiming, OptimizerTiming, Profile
from uniap.calibrate import Measurement, fit

GiB = 2**30
H200_1 = cluster_preset("dgx-h200").with_shape(1, 1)


def _llama(layers: int = 4):
    return replace(model_preset("llama2-7b"), num_layers=layers)


# --- model states as each framework keeps them --------------------------------------------------------


@pytest.mark.parametrize(
    "precision, plain, distributed", [("bf16", 18, (6, 12)), ("fp16", 20, (4, 16)), ("fp32", 16, (8, 8))]
)
def test_megatron_state_bytes_are_the_developer_guide_table(precision, plain, distributed):
    """Megatron Core developer guide, "Distributed Optimizer": bytes per parameter without / with it."""
    accounting = capability_for("megatron").accounting
    assert accounting.state_bytes(precision, 0) == PerParam(plain)
    assert accounting.state_bytes(precision, 1) == PerParam(*distributed)
    assert accounting.state_bytes(precision, 1).at(1) == plain  # d = 1 holds everything
    assert accounting.state_bytes(precision, 3).at(8) == pytest.approx(plain / 8)


def test_generic_state_bytes_are_the_zero_paper():
    assert GENERIC_ACCOUNTING.state_bytes("bf16", 0).at(1) == 16
    assert GENERIC_ACCOUNTING.state_bytes("bf16", 1).at(4) == 4 + 12 / 4
    assert GENERIC_ACCOUNTING.state_bytes("bf16", 2).at(4) == 2 + 14 / 4
    assert GENERIC_ACCOUNTING.state_bytes("bf16", 3).at(4) == 16 / 4
    with pytest.raises(SpecError, match="no model-state bytes"):
        capability_for("megatron").accounting.state_bytes("bf16", 2)


def test_megatron_prices_its_own_bytes_per_parameter():
    """A one-GPU Megatron plan's states are 18 bytes per parameter in bf16 (the generic target's 16)."""
    model, training = _llama(), TrainingSpec(global_batch_size=2, seq_length=1024)
    params = sum(layer.params for layer in build_graph(model, training).layers)
    for target, per_param in (("megatron", 18), ("generic", 16)):
        plan, pred = configure(model, H200_1, training, target)
        assert pred.stage_breakdown[0].states == pytest.approx(per_param * params)
        assert plan.stages[0].states_bytes == pytest.approx(per_param * params)


def test_torch_adam_fallback_adds_an_fp32_temporary_at_the_step():
    """Without Transformer Engine/Apex megatron-core steps with torch's foreach AdamW: +4 B per parameter."""
    model = _llama()
    fused = TrainingSpec(global_batch_size=2, seq_length=1024)
    unfused = replace(fused, fused_kernels=False)
    params = sum(layer.params for layer in build_graph(model, fused).layers)
    _, with_te = configure(model, H200_1, fused, "megatron")
    _, without = configure(model, H200_1, unfused, "megatron")
    assert with_te.stage_breakdown[0].step_states == pytest.approx(18 * params)
    assert without.stage_breakdown[0].step_states == pytest.approx((18 + FOREACH_ADAM_TEMPORARY) * params)
    # ... and more time: the unfused optimizer and a separate gradient-accumulation pass per micro-batch.
    assert without.time_per_iteration > with_te.time_per_iteration


def test_reserved_memory_is_allocated_times_the_allocator_ratio():
    _, pred = configure(_llama(), H200_1, TrainingSpec(global_batch_size=2, seq_length=1024), "megatron")
    stage = pred.stage_breakdown[0]
    assert stage.allocated_peak == max(stage.training_peak, stage.step_peak)
    assert pred.stage_memory[0] == pytest.approx(stage.allocated_peak * DEFAULT_RESERVED_PER_ALLOCATED)
    assert pred.memory_capacity == H200_1.usable_memory_bytes * (1 - ESTIMATED_MEMORY_MARGIN)


def test_llama2_7b_on_one_h200_without_fused_kernels_does_not_fit(capsys):
    """Measured on an H200 with megatron-core 0.16.1 and torch's AdamW: this job ran out of memory even with
    full recompute. With fused kernels it fits only with full recompute or with some layers' activations in
    host memory (Transformer Engine's offload)."""
    job = (
        "--model",
        "llama2-7b",
        "--cluster",
        "dgx-h200",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--global-batch-size",
        "8",
        "--seq-length",
        "4096",
        "--target",
        "megatron",
    )
    code, _, err = run_main(capsys, "plan", *job, "--no-fused-kernels")
    assert code == 3 and "no plan fits" in err
    assert_clean_error(err)
    code, out, _ = run_main(capsys, "plan", *job, "--json")
    plan = Plan.from_dict(json.loads(out))
    assert code == 0 and (plan.uniform_strategy.recompute == "full" or plan.offloaded_layers > 0)
    assert plan.stages[0].memory_bytes <= plan.memory_capacity_bytes


# --- compute time ------------------------------------------------------------------------------------


def test_device_coefficients_by_gpu_name():
    assert device_coefficients("NVIDIA H200") is DEVICE_COEFFICIENTS["H200"]
    assert device_coefficients("NVIDIA H100 80GB HBM3") is DEVICE_COEFFICIENTS["H100"]
    assert device_coefficients("A100-SXM-80GB") is DEVICE_COEFFICIENTS["A100"]
    assert device_coefficients("Tesla V100") is GENERIC_DEVICE
    assert all(c.source for c in (*DEVICE_COEFFICIENTS.values(), GENERIC_DEVICE))
    # A cluster file's matmul_efficiency overrides the GEMM part by hand.
    forced = replace(cluster_preset("dgx-h100"), matmul_efficiency=0.5).coefficients
    assert (forced.gemm_forward, forced.gemm_backward) == (0.5, 0.5) and "set in the cluster spec" in forced.source


def test_estimated_layer_times_on_h200_are_close_to_measured():
    """The H200 defaults against the layer measured on that GPU (plain PyTorch Llama-2-7B layer, SDPA, bf16,
    forward / backward ms at micro-batch 1, 2, 4)."""
    training = TrainingSpec(global_batch_size=4, seq_length=4096)
    layer = build_graph(model_preset("llama2-7b"), training).layers[1]
    cm = CostModel(H200_1, training)
    for mbs, fwd_ms, bwd_ms in ((1, 2.91, 6.73), (2, 5.80, 13.09), (4, 11.78, 26.12)):
        fwd, bwd = cm.estimated_compute_times(layer, 1, mbs)
        assert fwd * 1e3 == pytest.approx(fwd_ms, rel=0.10) and bwd * 1e3 == pytest.approx(bwd_ms, rel=0.10)


def test_per_sample_time_falls_with_the_micro_batch():
    training = TrainingSpec(global_batch_size=8, seq_length=2048)
    layer = build_graph(model_preset("llama2-7b"), training).layers[1]
    cm = CostModel(cluster_preset("dgx-a100-80g"), training)
    per_sample = [sum(cm.estimated_compute_times(layer, 1, b)) / b for b in (1, 2, 4, 8)]
    assert per_sample == sorted(per_sample, reverse=True) and per_sample[0] > per_sample[-1] * 1.05


def test_causal_flash_attention_executes_half_the_scores():
    """MFU counts the full s x s product; a causal flash kernel executes half of it."""
    short, long_ = (TrainingSpec(global_batch_size=1, seq_length=s) for s in (1024, 8192))
    cm = CostModel(H200_1, long_)
    flash = build_graph(model_preset("llama3-8b"), long_).layers[1]
    assert flash.causal_attention_flops == flash.attention_flops > 0
    encoder = build_graph(model_preset("bert-large"), TrainingSpec(global_batch_size=1, seq_length=512)).layers[1]
    assert encoder.causal_attention_flops == 0 < encoder.attention_flops
    slow = CostModel(H200_1, replace(long_, flash_attention=False))
    no_flash = build_graph(model_preset("llama3-8b"), replace(long_, flash_attention=False)).layers[1]
    assert cm.estimated_compute_times(flash, 1, 1)[0] < slow.estimated_compute_times(no_flash, 1, 1)[0]
    assert short.seq_length < long_.seq_length


# --- the vocabulary as the framework builds it ---------------------------------------------------------


def _head(vocab: int, training: TrainingSpec):
    model = replace(model_preset("gpt3-2.7b"), num_layers=1, vocab_size=vocab)
    return build_graph(model, training).layers[-1]


def test_only_a_head_has_logits():
    training = TrainingSpec(global_batch_size=1, seq_length=2048)
    layers = build_graph(replace(model_preset("gpt3-2.7b"), num_layers=2), training).layers
    assert [(layer.vocab_size, layer.logits) for layer in layers[:-1]] == [(0, 0.0)] * 3
    assert (layers[-1].vocab_size, layers[-1].logits) == (50257, 2048.0 * 50257)


@pytest.mark.parametrize(
    "vocab, multiple, tp, precision, aligned",
    [
        (50257, 1, 1, "bf16", False),  # GPT-2's vocabulary as Hugging Face and DeepSpeed build it
        (50257, 128, 1, "bf16", True),  # Megatron pads it to 50304
        (50257, 128, 8, "bf16", True),  # to 51200 over 8 ranks: 6400 each
        (32000, 1, 1, "bf16", True),
        (32004, 1, 1, "bf16", False),
        (32004, 1, 1, "fp32", True),  # 16 bytes are 4 fp32 values
        (32000, 1, 3, "bf16", False),  # 10666.7 per rank: not even a whole share
    ],
)
def test_vocab_alignment_as_the_framework_pads(vocab, multiple, tp, precision, aligned):
    training = TrainingSpec(global_batch_size=1, seq_length=128, precision=precision)
    assert CostModel(H200_1, training, vocab_multiple=multiple).vocab_aligned(vocab, tp) is aligned


def test_an_unpadded_vocabulary_slows_the_output_projection_as_measured():
    """On the H200 an output projection over 50,257 tokens ran at 0.17 of the aligned GEMM efficiency
    (devices.py); padding to 50,304, or a framework that pads, removes the penalty."""
    training = TrainingSpec(global_batch_size=4, seq_length=2048)
    unpadded, padded = CostModel(H200_1, training), CostModel(H200_1, training, vocab_multiple=128)
    head, head_50304 = _head(50257, training), _head(50304, training)
    slow, fast = unpadded.estimated_compute_times(head, 1, 4), padded.estimated_compute_times(head, 1, 4)
    gemm_fwd = 2 * head.hidden_size * head.logits * 4 / (H200_1.peak_tflops * 1e12 * H200_1.coefficients.gemm_forward)
    misaligned = H200_1.coefficients.misaligned_gemm
    assert slow[0] - fast[0] == pytest.approx(gemm_fwd * (1 / misaligned - 1), rel=1e-9)
    assert slow[1] > 2 * fast[1]
    near = unpadded.estimated_compute_times(head_50304, 1, 4)
    assert near[0] == pytest.approx(fast[0], rel=0.01)  # 47 more tokens, nothing else
    layer = build_graph(replace(model_preset("gpt3-2.7b"), num_layers=1), training).layers[1]
    assert unpadded.estimated_compute_times(layer, 1, 4) == padded.estimated_compute_times(layer, 1, 4)


def test_deepspeed_plans_price_the_unpadded_vocabulary_and_megatron_pads():
    model = replace(model_preset("gpt3-2.7b"), num_layers=2)
    training = TrainingSpec(global_batch_size=4, seq_length=2048)
    padded = replace(model, vocab_size=50304)

    def time(target, m):
        return configure(m, H200_1, training, target=target, tp=1, pp=1, micro_batch_size=4, zero=0)[0]

    assert time("deepspeed", model).time_per_iteration > 1.3 * time("deepspeed", padded).time_per_iteration
    assert time("megatron", model).time_per_iteration == pytest.approx(
        time("megatron", padded).time_per_iteration, rel=0.01
    )


def test_a_plain_pytorch_loss_allocates_per_logit_in_backward():
    """DeepSpeed runs the user's loss (torch cross-entropy over fp32 logits): 8 bytes per logit beyond the
    saved activations while the head's backward runs, as measured on an H200; Megatron's vocab-parallel
    cross-entropy reuses its buffer."""
    training = TrainingSpec(global_batch_size=4, seq_length=2048)
    model = replace(model_preset("gpt3-2.7b"), num_layers=1)
    graph = build_graph(model, training)
    head, layer = graph.layers[-1], graph.layers[1]
    cm = CostModel(H200_1, training)
    plain = Strategy(tp=1, dp=1, zero=0, recompute="none")
    deepspeed, megatron = capability_for("deepspeed").accounting, capability_for("megatron").accounting
    assert cm.layer_cost(head, plain, 4, 1, True, deepspeed).backward_transient_bytes == 8.0 * 4 * 2048 * 50257
    assert cm.layer_cost(head, plain, 4, 1, True, megatron).backward_transient_bytes == 0
    assert cm.layer_cost(layer, plain, 4, 1, True, deepspeed).backward_transient_bytes == 0


# --- profiles: interpolation, measured activations and optimizer step --------------------------------


def _profile(points, **kw) -> Profile:
    return Profile(
        device="d",
        runtime="r",
        layers={
            "sig": [
                LayerTiming(tp=1, micro_batch_size=b, forward_ms=f, backward_ms=2 * f, activation_bytes=a)
                for b, f, a in points
            ]
        },
        **kw,
    )


def test_profile_interpolates_and_extrapolates_within_proportional_bounds():
    p = _profile([(2, 5.0, 100.0), (4, 9.0, 200.0)])
    assert p.layer_times("sig", 1, 2) == (0.005, 0.010)
    assert p.layer_times("sig", 1, 3)[0] == pytest.approx(0.007)  # between the points
    assert p.layer_times("sig", 1, 8)[0] == pytest.approx(0.017)  # the last segment's line ...
    assert p.layer_times("sig", 1, 1)[0] == pytest.approx(0.003)  # ... and the first one's
    assert p.layer_activation_bytes("sig", 1, 3) == pytest.approx(150.0)
    # Never below proportional scaling of the smallest point, never above that of the largest.
    steep = _profile([(2, 2.0, None), (4, 9.0, None)])
    assert steep.layer_times("sig", 1, 1)[0] == pytest.approx(0.001)
    assert steep.layer_times("sig", 1, 8)[0] == pytest.approx(0.018)
    one = _profile([(2, 4.0, None)])
    assert one.layer_times("sig", 1, 3)[0] == pytest.approx(0.006)
    assert one.layer_activation_bytes("sig", 1, 3) is None


def test_measured_activation_bytes_and_optimizer_step_drive_the_cost():
    training = TrainingSpec(global_batch_size=2, seq_length=1024)
    graph = build_graph(_llama(1), training)
    layer = graph.layers[1]
    profile = Profile(
        device="H200",
        runtime="r",
        layers={
            layer.signature: [
                LayerTiming(tp=1, micro_batch_size=1, forward_ms=1.0, backward_ms=2.0, activation_bytes=123456.0)
            ]
        },
        optimizer=OptimizerTiming(
            implementation="test Adam", num_params=1_000_000, step_ms=2.0, extra_peak_bytes=4_000_000.0
        ),
    )
    cm = CostModel(H200_1, training, profile)
    accounting = capability_for("megatron").accounting
    cost = cm.layer_cost(layer, Strategy(1, 1), 1, 1, True, accounting)
    assert cost.activation_bytes == 123456.0 and cost.activation_basis == "measured"
    assert cost.step_bytes == pytest.approx((18 + 4.0) * layer.params)  # 4 B per parameter at the step, measured
    assert cost.time_per_iteration == pytest.approx(2e-3 * layer.params / 1e6)
    full = cm.layer_cost(layer, Strategy(1, 1, recompute="full"), 1, 1, True, accounting)
    assert full.activation_basis == "estimated" and full.backward_transient_bytes == 123456.0


def test_profile_v2_round_trip_and_v1_still_read(tmp_path):
    run = dict(label="r", job={"model": "m"}, measured_time_s=1.0, predicted_time_s=0.9, fitted_time_s=1.0)
    from uniap.profile import CalibrationRun

    p = _profile(
        [(1, 1.0, 10.0)],
        optimizer=OptimizerTiming("a", 10, 1.0),
        calibration=Calibration(
            compute_scale=1.1, reserved_per_allocated=1.07, runs=(CalibrationRun(**run),), source="test"
        ),
    )
    path = tmp_path / "p.json"
    p.save(path)
    again = Profile.load(path)
    assert again.to_dict() == p.to_dict() and again.calibration.runs[0].label == "r"
    old = {"format": "uniap-profile", "version": 1, "device": "d", "runtime": "r", "layers": {}, "collectives": []}
    path.write_text(json.dumps(old))
    assert Profile.load(path).calibration is None


@pytest.mark.parametrize(
    "calibration, words",
    [
        ({"compute_scale": 9.0}, "compute_scale"),
        ({"compute_scale": 1.0, "reserved_per_allocated": 0.1}, "reserved_per_allocated"),
        (
            {"runs": [{"label": "r", "job": {}, "measured_time_s": -1, "predicted_time_s": 1, "fitted_time_s": 1}]},
            "measured_time_s",
        ),
        ("nope", "calibration must be a mapping"),
    ],
)
def test_corrupt_calibration_is_a_profile_error(tmp_path, calibration, words):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "uniap-profile", "version": 2, "calibration": calibration}))
    with pytest.raises(ProfileError, match=words):
        Profile.load(path)


# --- saved plans priced as they are ------------------------------------------------------------------


def _head_alone_plan() -> Plan:
    """A two-stage plan whose last stage holds only the LM head (no --split can say that)."""
    model, training = _llama(4), TrainingSpec(global_batch_size=8, seq_length=1024)
    plan, _ = configure(model, cluster_preset("dgx-h100").with_shape(1, 2), training, "megatron", pp=2)
    data = plan.to_dict()
    for lp in data["layers"]:
        lp["stage"] = 1 if lp["kind"] == "head" else 0
    return Plan.from_dict(data)


def test_price_reproduces_a_plan_and_prices_a_head_only_stage():
    plan, pred = configure(
        _llama(4),
        H200_1,
        TrainingSpec(global_batch_size=4, seq_length=1024),
        "megatron",
        micro_batch_size=2,
        recompute="full",
    )
    assert price(plan).prediction.time_per_iteration == pytest.approx(pred.time_per_iteration, rel=1e-12)
    priced = price(_head_alone_plan())
    assert len(priced.prediction.stage_time) == 2
    assert priced.prediction.stage_breakdown[1].activations > 0  # the head's logits and fp32 softmax


def test_evaluate_plan_cli(capsys, tmp_path):
    path = tmp_path / "head_alone.json"
    _head_alone_plan().save(path)
    code, out, err = run_main(capsys, "evaluate", "--plan", str(path), "--json")
    assert code == 0, err
    priced = Plan.from_dict(json.loads(out))
    assert [s.num_layers for s in priced.stages] == [5, 1]
    code, _, err = run_main(capsys, "evaluate", "--plan", str(path), "--tp", "2")
    assert code == 2 and "cannot be combined with --tp" in err
    assert_clean_error(err)


# --- calibration -------------------------------------------------------------------------------------


def test_fit_matches_measured_time_and_never_under_predicts_memory():
    plans = [
        configure(
            _llama(2), H200_1, TrainingSpec(global_batch_size=b, seq_length=1024), "megatron", micro_batch_size=b
        )[0]
        for b in (1, 2)
    ]
    predicted = [price(p).prediction for p in plans]
    measurements = [
        Measurement(
            "a",
            plans[0],
            predicted[0].time_per_iteration * 1.20,
            peak_reserved_bytes=predicted[0].stage_breakdown[0].allocated_peak * 1.10,
        ),
        Measurement(
            "b",
            plans[1],
            predicted[1].time_per_iteration * 1.25,
            peak_reserved_bytes=predicted[1].stage_breakdown[0].allocated_peak * 1.02,
        ),
    ]
    result = fit(measurements)
    cal = result.profile.calibration
    assert cal.reserved_per_allocated == pytest.approx(1.10)
    assert cal.compute_scale > 1.20  # only compute scales, so more than the time per iteration's 20-25 %
    for run, m in zip(result.runs, measurements):
        assert run.fitted_peak_bytes >= m.peak_reserved_bytes * (1 - 1e-9)
        assert abs(run.fitted_time_s / m.time_per_iteration_s - 1) < 0.03
    one = fit(measurements[:1]).runs[0]
    assert one.fitted_time_s == pytest.approx(one.measured_time_s, rel=1e-6)
    with pytest.raises(ProfileError, match="outside what"):
        fit([Measurement("x", plans[0], predicted[0].time_per_iteration * 50)])


def test_pinned_selective_recompute_with_flash_attention_repeats_the_attention(capsys):
    """With flash attention there are no scores to drop: selective recompute is offered only when pinned, and
    costs the attention's forward again (the core prices it; no adapter switches flash attention off)."""
    training = TrainingSpec(global_batch_size=4, seq_length=4096)
    _, none = configure(_llama(2), H200_1, training, "megatron")
    _, selective = configure(_llama(2), H200_1, training, "megatron", recompute="selective")
    assert selective.time_per_iteration > none.time_per_iteration
    assert selective.stage_breakdown[0].activations <= none.stage_breakdown[0].activations
    job = ("plan", "--model", "llama2-7b", "--target", "megatron", "--json")
    code, out, _ = run_main(capsys, *job, "--recompute", "selective")
    plan = Plan.from_dict(json.loads(out))
    assert code == 0 and plan.training.flash_attention is True
    assert {lp.strategy.recompute for lp in plan.layers if lp.kind == "transformer"} == {"selective"}
    code, out, _ = run_main(capsys, *job)
    assert "selective" not in {lp.strategy.recompute for lp in Plan.from_dict(json.loads(out)).layers}


@pytest.mark.parametrize("optimizer, fewer", [("adam", 0.0), ("sgd", 4.0), ("muon", 4.0)])
def test_optimizers_with_one_state_keep_four_bytes_less_per_parameter(optimizer, fewer):
    """SGD with momentum and Muon keep one fp32 state where Adam keeps two: 4 bytes per parameter fewer, from
    the ZeRO-sharded part when there is one."""
    from uniap.cost.accounting import with_optimizer

    from uniap_megatron.capability import MEGATRON_ACCOUNTING

    for zero in (0, 1, 3):
        adam = MEGATRON_ACCOUNTING.state_bytes("bf16", zero)
        other = MEGATRON_ACCOUNTING.state_bytes("bf16", zero, optimizer=optimizer)
        assert adam.at(1) - other.at(1) == fewer
        assert adam.replicated - other.replicated == (fewer if zero == 0 else 0.0)
    assert with_optimizer(PerParam(16.0), optimizer).at(8) == 16.0 - fewer
