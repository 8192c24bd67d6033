"""The whole-model calibration run of `uniap-deepspeed profile` (uniap_deepspeed.training_run) on the CPU.

The whole model is checked in-process (torch only: its parameters are the plan's, its loss finite). The
DeepSpeed run itself goes through a subprocess with DS_ACCELERATOR=cpu, as the profiler tests do, so
this pytest process never holds a process group. The CLI's calibration (fit included) is tested in
tests/test_deepspeed_profile.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from processes import child_env
from uniap.profile.runner import free_port
from uniap.cluster import CLUSTER_PRESETS
from uniap.model import ModelSpec, TrainingSpec, build_graph
from uniap.planner import configure
from uniap.profile import Profile
from uniap.calibrate import Measurement, fit_run

from uniap_deepspeed.training_run import build_training_module, reduced_model

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

BASE = {
    "num_layers": 3,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "ffn_hidden_size": 64,
    "max_position_embeddings": 16,
}
MODELS = {
    "gpt": ModelSpec(name="gpt", architecture="decoder", vocab_size=50, **BASE),
    "llama": ModelSpec(
        name="llama",
        architecture="decoder",
        vocab_size=50,
        tied_embeddings=False,
        position_embedding="rope",
        gated_mlp=True,
        normalization="rmsnorm",
        add_bias=False,
        num_query_groups=2,
        **BASE,
    ),
    "bert": ModelSpec(name="bert", architecture="encoder", vocab_size=50, **BASE),
    "t5": ModelSpec(
        name="t5",
        architecture="encoder_decoder",
        vocab_size=50,
        num_decoder_layers=3,
        position_embedding="relative",
        **BASE,
    ),
    "vit": ModelSpec(name="vit", architecture="vit", image_size=32, patch_size=8, num_classes=10, **BASE),
}
TINY = """\
name: tiny
architecture: decoder
num_layers: 4
hidden_size: 64
num_attention_heads: 4
ffn_hidden_size: 128
vocab_size: 100
max_position_embeddings: 32
"""
# Runs in a fresh process: a 1-rank gloo group, then 1 warm-up + 5 timed iterations of the 2-layer model.
RUN = """\
import json, sys
from uniap.model import TrainingSpec, load_model
from uniap.profile.runner import default_single_process_env
from uniap_deepspeed import profile, runtime
from uniap.profile.harness import RunSchedule
from uniap_deepspeed.training_run import device_cluster, reduced_model, run_training

runtime.quiet_deepspeed(False)
default_single_process_env(profile.LAUNCHER_VARS)
runtime.init_distributed()
model = reduced_model(load_model(sys.argv[1]), 2)
run = run_training(model, TrainingSpec(global_batch_size=1, seq_length=32), None,
                   RunSchedule(micro_batch_size=1, micro_batches=2, warmup=1, iterations=5))
cluster = device_cluster()
print(json.dumps({"losses": run.losses, "times": run.iteration_times_s, "time": run.time_per_iteration_s,
                  "reserved": run.peak_reserved_bytes, "allocated": run.peak_allocated_bytes,
                  "optimizer": run.optimizer, "config": run.config, "target": run.plan.target,
                  "layers": [layer.name for layer in run.plan.layers], "cluster": cluster.to_dict()}))
"""


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_holds_the_plans_parameters(name):
    """Built from the profiler's layer modules, tied where the graph ties, the model has exactly the parameters
    the planner counts (a tied layer's matrix once), and trains: a finite loss with gradients everywhere."""
    small = reduced_model(MODELS[name], 2)
    assert small.num_layers == 2 and small.name == f"{name}-2l"
    training = TrainingSpec(global_batch_size=2, seq_length=16)
    graph = build_graph(small, training)
    assert sum(layer.kind in ("transformer", "cross_transformer") for layer in graph.layers) == (
        4 if name == "t5" else 2
    )
    torch.manual_seed(0)
    module = build_training_module(small, training)
    expected = sum((0 if layer.tied_weights else layer.params_tp) + layer.params_rep for layer in graph.layers)
    assert sum(p.numel() for p in module.parameters()) == expected
    loss = module(*module.example_batch(2, "cpu", torch.float32))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_reduced_model_needs_a_layer():
    with pytest.raises(ValueError, match="at least one transformer layer"):
        reduced_model(MODELS["gpt"], 0)


@pytest.mark.parametrize("reserved_per_allocated, fitted", [(1.2, True), (10.0, False)])
def test_fit_keeps_the_time_when_the_memory_ratio_is_out_of_range(reserved_per_allocated, fitted):
    """What a CUDA run fits (no GPU needed: the plan is priced, the measurement made up): time and memory; a
    peak the Calibration's reserved/allocated range (0.5 .. 3) cannot hold leaves memory unfitted, not the time."""
    model = reduced_model(MODELS["gpt"], 2)
    cluster = CLUSTER_PRESETS["dgx-h100"].with_shape(1, 1)
    plan, prediction = configure(
        model, cluster, TrainingSpec(global_batch_size=2, seq_length=16), target="deepspeed", micro_batch_size=1
    )
    allocated = max(stage.allocated_peak for stage in prediction.stage_breakdown)
    measured = Measurement(
        "run", plan, 1.5 * prediction.time_per_iteration, peak_reserved_bytes=reserved_per_allocated * allocated
    )
    profile, problem = fit_run(measured, Profile(device="GPU", runtime="deepspeed"), "test")
    calibration = profile.calibration
    (run,) = calibration.runs
    assert abs(run.fitted_time_s - run.measured_time_s) <= 1e-6 * run.measured_time_s
    if fitted:
        assert problem is None and calibration.reserved_per_allocated == pytest.approx(1.2)
        assert run.memory_kind == "reserved" and run.measured_peak_bytes == pytest.approx(1.2 * allocated)
    else:
        assert "memory not fitted" in problem and calibration.reserved_per_allocated is None


@pytest.mark.slow
def test_training_run_through_deepspeed_with_uniaps_config(tmp_path):
    """One process, DeepSpeed's CPU accelerator: the config is the one uniap emits for the plan plus an AdamW
    section; the loss on the fixed batch is finite and falls; timings are positive; no CUDA peaks."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    env = child_env(DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    losses = result["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert len(result["times"]) == 5 and all(t > 0 for t in result["times"])
    assert result["time"] == sorted(result["times"])[2]  # the median (one rank)
    assert result["reserved"] is None and result["allocated"] is None
    assert result["optimizer"].startswith("torch.optim.AdamW")

    config = result["config"]
    assert (
        config["train_batch_size"],
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    ) == (2, 1, 2)
    assert config["zero_optimization"] == {"stage": 0}
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in config and "fp16" not in config  # the CPU computes in fp32
    assert config["uniap"]["pipeline_stages"] == 1 and config["uniap"]["data_parallel_size"] == 1
    assert result["target"] == "deepspeed"
    assert result["layers"] == ["embedding", "layer.0", "layer.1", "lm_head"]

    cluster = result["cluster"]
    assert (cluster["num_nodes"], cluster["gpus_per_node"]) == (1, 1)
    assert cluster["gpu_name"].startswith("cpu (") and cluster["peak_tflops"] == 989.0  # dgx-h100's
