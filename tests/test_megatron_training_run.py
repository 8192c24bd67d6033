"""uniap_megatron.training_run on the CPU: a megatron-core GPTModel trained through megatron-core's DDP and
distributed optimizer as Megatron-LM trains it (one gloo process, a subprocess of the product code), and the
CPU redirection that lets those run without CUDA."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from uniap.errors import SpecError
from uniap.model import ModelSpec, load_model

from uniap_megatron.runtime import cuda_calls_on_cpu
from uniap_megatron.training_run import device_cluster, reduced_model

TINY = {
    "name": "tiny",
    "architecture": "decoder",
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 96,
    "vocab_size": 200,
    "max_position_embeddings": 32,
    "gated_mlp": True,
    "normalization": "rmsnorm",
    "position_embedding": "rope",
    "add_bias": False,
    "tied_embeddings": False,
    "dropout": 0.0,
}

# One process: a gloo group of one, the run, its numbers as JSON on the last line.
RUN = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from uniap.model import ModelSpec, TrainingSpec
from uniap.profile.runner import default_single_process_env
from uniap_megatron.runtime import init_distributed
from uniap.profile.harness import RunSchedule
from uniap_megatron.training_run import reduced_model, run_training
default_single_process_env()
init_distributed()
model = reduced_model(ModelSpec.from_dict(json.loads(sys.argv[1])), 2)
run = run_training(model, TrainingSpec(global_batch_size=2, seq_length=32, precision="bf16"), None,
                   RunSchedule(micro_batch_size=1, micro_batches=2, warmup=1, iterations=4), lr=3e-3)
print(json.dumps({"losses": run.losses, "times": run.iteration_times_s, "median": run.time_per_iteration_s,
                  "reserved": run.peak_reserved_bytes, "allocated": run.peak_allocated_bytes,
                  "optimizer": run.optimizer, "skipped": run.skipped_steps, "micro_batches": run.plan.micro_batches,
                  "target": run.plan.target, "layers": [lp.name for lp in run.plan.layers],
                  "training": run.plan.training.to_dict(), "gpus": run.plan.cluster.gpus_per_node}))
"""


@pytest.mark.slow  # ~8 s: a training subprocess
def test_training_run_loss_is_finite_and_falls(tmp_path):
    """Five iterations of two micro-batches on one fixed batch: the loss memorises it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(TINY)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = run["losses"]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert len(run["times"]) == 4 and run["median"] == pytest.approx(statistics.median(run["times"]))
    assert run["reserved"] is None and run["allocated"] is None  # CPU: no memory numbers
    assert run["optimizer"] == "torch.optim.AdamW (for-loop) in megatron-core DistributedOptimizer"
    assert run["skipped"] == 0
    assert run["target"] == "megatron" and run["micro_batches"] == 2 and run["gpus"] == 1
    assert run["layers"] == ["embedding", "layer.0", "layer.1", "lm_head"]
    assert run["training"]["global_batch_size"] == 2 and run["training"]["fused_kernels"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection is a no-op with CUDA")
def test_cuda_calls_on_cpu_redirects_only_inside():
    with cuda_calls_on_cpu():
        t = torch.zeros(3, device="cuda")
        assert t.device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.cuda.current_device() == "cpu"
        assert t.type(torch.float64).dtype == torch.float64  # type(dtype) converts as usual
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_reduced_model_and_device_cluster():
    model = ModelSpec.from_dict(TINY)
    small = reduced_model(model, 2)
    assert small.num_layers == 2 and small.hidden_size == model.hidden_size and small.name == "tiny-2l"
    with pytest.raises(SpecError, match="at least one"):
        reduced_model(model, 0)
    with pytest.raises(SpecError, match="decoder models only"):
        reduced_model(load_model("bert-large"), 2)
    cluster = device_cluster()
    assert cluster.num_gpus == 1 and cluster.gpu_memory_gib > cluster.reserved_memory_gib
    if not torch.cuda.is_available():
        assert cluster.gpu_name.startswith("cpu (") and cluster.peak_tflops == 989.0  # dgx-h100's figures
