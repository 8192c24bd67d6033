"""DeepSpeed 0.19.8 really keeps the model-state bytes uniap's DeepSpeed accounting declares.

The planner's memory prediction for a DeepSpeed plan rests on `DEEPSPEED.accounting` (uniap_deepspeed/
capability.py): bytes per parameter of model states per (precision, ZeRO stage) while the model computes,
`state_bytes(precision, zero).at(d)`, and at the optimizer step's peak, `step_bytes(precision, zero).at(d)`, for
the config uniap emits (uniap_deepspeed/config.py: bf16 enabled, no data_types.grad_accum_dtype, overlap_comm on
for ZeRO >= 1 without a pipeline) and an AdamW optimizer section, which DeepSpeed runs as its FusedAdam (built
and run on the CPU as well). If these bytes are wrong, every fits / out-of-memory verdict for a DeepSpeed plan is
wrong by that much per parameter. This test measures them on real DeepSpeed training instead of trusting the
reading of its source.

`python -m torch.distributed.run --nproc-per-node 2 tests/deepspeed_memory_run.py` trains a 1,056,768-parameter
stack of nn.Linear layers on 2 CPU processes joined by gloo (DS_ACCELERATOR=cpu) under each configuration below,
two steps of 2 micro-batches each, and reports per rank the bytes of the distinct tensor storages held by the
engine, its module and its optimizers (deduplicated by storage), after each micro-batch's backward and after the
step of the second step, and the optimizer step's peak from torch.profiler's allocation events. Where the bytes
come from in DeepSpeed 0.19.8 (deepspeed/):
- runtime/fp16/fused_optimizer.py (FP16_Optimizer, bf16 without ZeRO): a flat bf16 copy of the weights, the fp32
  master copy and Adam's moments (made by a dummy step at init), the bf16 gradients until the step; the step
  casts every gradient to fp32 and flattens them (runtime/bf16_optimizer.py's BF16_Optimizer is the pipeline's
  wrapper, not run here);
- runtime/zero/stage_1_and_2.py (DeepSpeedZeroOptimizer): the flat bf16 weights, the fp32 master partition and
  Adam's moments for it; ZeRO-1 keeps whole gradients between the micro-batches of an accumulation step (it
  reduces only at the boundary), ZeRO-2 the gradients of its partition (grads_in_partition); the step flattens
  the partition's gradients and casts them to fp32;
- runtime/zero/stage3.py (DeepSpeedZeroOptimizer_Stage3): the partitioned bf16 weights, a permanent gradient
  partition (grad_partitions_flat_buffer), the fp32 master partition and moments; the step flattens and casts a
  sub-group's gradients;
- fp32 without ZeRO has no wrapper: FusedAdam steps the model's parameters with their gradients in place.

Checked per configuration and rank, against the accounting at d = 2 and P = the model's parameters:
- DeepSpeed runs what the accounting assumes: the wrapper named above, FusedAdam, no skipped step;
- while computing: the highest held bytes over the second step's micro-batches (after backward, before
  engine.step()), less the buffers that do not scale with the model, == state_bytes.at(2) * P. ZeRO-1's highest
  is after the first micro-batch (whole gradients, 4 + 12/d); after the last one it holds 2 + 14/d;
- at the step: the bytes held before the second boundary engine.step() plus its allocation peak above its start,
  less the permanent buffers, == step_bytes.at(2) * P. The peak is trusted because the step's net allocation
  (final minus start) equals the change of the held bytes across it, checked too: the profiler misses what
  gloo's worker threads free, and a missed free inside the step would inflate the peak;
- nothing outside the engine holds model states (any other tensor alive is at most two reduce buckets);
- the buffers held while computing (ZeRO's IPG reduce buckets, found by DeepSpeed's attribute name ipg_buckets)
  stay within the accounting's buffers for the stage (Accounting.buffers at HIDDEN_FOR_BUCKETS, its constant
  part scaled like the sizes).
The buffers and ZeRO-3's persistent parameters (held whole, in the model's dtype, except during the step, which
partitions them and gathers them again afterwards, stage3.py) do not scale with the model and are taken off by
name and numel, so what is left is SLACK bytes: Adam's and the gradient norm's scalars (4-13 bytes held) and the
step's per-tensor norm partials (up to 1.6 KB). That is under 1/100 of the smallest term of any entry of the
accounting (2/d bytes per parameter, 1 MB here), so a wrong term cannot hide in it.

The sizes: uniap sizes the reduce, all-gather and prefetch buckets from the model's hidden size (h*h, 0.9*h*h);
the section is made for h = HIDDEN_FOR_BUCKETS, whose buckets hold about two weight gradients (BUCKET = 32,768
elements, 0.06 bytes per parameter in bf16) instead of dwarfing a 1M-parameter model, and a bucket still holds
any single gradient (larger ones bypass ZeRO-1/2's contiguous bucket, a different code path). The sizes that do
not follow the model (stage3_max_live_parameters, stage3_max_reuse_distance) are multiplied by SCALE = BUCKET /
DeepSpeed's 5e8-element default. The
stage3_param_persistence_threshold is a size per parameter, not a buffer: PERSISTENCE keeps the biases (128
elements) whole under ZeRO-3 and partitions the weights (16,384), as uniap's 1e5 does for a real model's norms
and weights (1e5 scaled would partition everything, 1e5 itself would partition nothing here).

Measured (both ranks, every run so far: within 13 bytes while computing and 1.6 KB at the step of the declared
bytes), bytes per parameter while computing / at the step's peak, the accounting in parentheses:
bf16 ZeRO-0 16 / 24 (16 / 24), ZeRO-1 10 / 12 (4 + 12/d / 2 + 20/d), ZeRO-2 9 / 12 (2 + 14/d / 2 + 20/d),
ZeRO-3 8 / 11 (16/d / 22/d); fp32 ZeRO-0 16 / 16 (16 / 16), ZeRO-1 14 / 14 (8 + 12/d / 4 + 20/d), ZeRO-2 12 / 14
(4 + 16/d / 4 + 20/d), ZeRO-3 10 / 12 (20/d / 24/d); besides, the buckets (ZeRO-1 two between micro-batches,
ZeRO-3 one, permanently; ZeRO-2 frees its own at the end of every backward) and ZeRO-3's whole biases.

Offloaded (offload_optimizer / offload_param to "cpu", DeepSpeedCPUAdam): on a CPU the host and the device are one
memory, so what is checked is the accounting's GPU and host bytes together (Offloaded.device + host, and at_step +
host), with offloading's two scratch buffers of the largest parameter taken off like the buckets. Measured (both
ranks, within 2 KB) bf16: ZeRO-1 13 / 13 (4 + 18/d; at the step 2 + 4/d on the GPU), ZeRO-2 12 / 14 (2 + 20/d;
2 + 4/d), ZeRO-3 optimizer 10 / 10 (2/d + 18/d), ZeRO-3 parameters too 10 / 10 (20/d on the host). Measured once
and not run here (2026-11-28, 40 s more): fp32 ZeRO-1 18 / 18, ZeRO-2 16 / 20, ZeRO-3 12 / 12 (both modes; the
step's reading includes ZeRO-3's whole persistent parameters, 32 KB), as the accounting declares.

Left out: fp16 (DeepSpeed refuses it on a CPU; it runs the same classes as bf16), other data-parallel sizes (2
CPU processes, so the replicated and the sharded part of an entry are not told apart, only their sum at d = 2),
the pipeline's BF16_Optimizer, and the transients of backward (the all-reduce's flattened copies, ZeRO-3's
gathered parameters), which the accounting covers with buffer_elements. The run takes 45-60 s on 2 busy CPU
cores; the first one on a machine also builds DeepSpeed's CPU FusedAdam op (torch extensions cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Checked without importing them here (the ranks import DeepSpeed; importing it costs seconds).
if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed (the measurement trains with DeepSpeed)", allow_module_level=True)
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from uniap.cost.strategy import OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, Strategy
from uniap_deepspeed.capability import DEEPSPEED, ZERO0_ALLREDUCE_CHUNK
from uniap_deepspeed.config import zero_section

TESTS = Path(__file__).parent
PROGRAM = TESTS / "deepspeed_memory_run.py"
D = 2
BUCKET = 32_768  # elements: two of the model's 128 x 128 weight gradients
# uniap sizes the buckets from the hidden size (h*h); this one gives about BUCKET.
HIDDEN_FOR_BUCKETS = 181
SCALE = BUCKET / ZERO0_ALLREDUCE_CHUNK  # for the sizes that do not follow the model
SIZES = ("stage3_max_live_parameters", "stage3_max_reuse_distance")
PERSISTENCE = 1024  # elements: ZeRO-3 keeps the biases (128) whole and partitions the weights (16,384)
SLACK = 8192  # bytes; see the module docstring
# Seconds for all launches: ~40-60 s on 2 busy CPU cores, plus, in a fresh environment, the first JIT builds of
# DeepSpeed's CPU FusedAdam, CPUAdam and shared-memory ops (measured 2026-12-07 in a clean clone: about 8 minutes
# on 2 cores beside the other tests; 420 s timed out).
RUN_TIMEOUT = 900
ITEMSIZE = {"bf16": 2, "fp32": 4}

pytestmark = [pytest.mark.slow]

# (precision, ZeRO stage, variant: an offload mode or FP32_ACCUMULATION); ZeRO-3 last: its engine leaves hooks and
# registries behind in the process.
FP32_ACCUMULATION = "fp32-accumulation"  # data_types.grad_accum_dtype fp32: what uniap emits for a bf16 pipeline
CONFIGS = [
    *((p, z, OFFLOAD_NONE) for p, z in (("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp32", 0), ("fp32", 1), ("fp32", 2))),
    ("bf16", 1, FP32_ACCUMULATION),
    ("bf16", 1, OFFLOAD_OPTIMIZER),
    ("bf16", 2, OFFLOAD_OPTIMIZER),
    ("bf16", 3, OFFLOAD_NONE),
    ("fp32", 3, OFFLOAD_NONE),
    ("bf16", 3, OFFLOAD_OPTIMIZER),
    ("bf16", 3, OFFLOAD_PARAMS),
]
WRAPPER = {
    0: "FP16_Optimizer",
    1: "DeepSpeedZeroOptimizer",
    2: "DeepSpeedZeroOptimizer",
    3: "DeepSpeedZeroOptimizer_Stage3",
}
ACCOUNTING = DEEPSPEED.accounting


def _name(config) -> str:
    precision, zero, offload = config
    if offload == FP32_ACCUMULATION:
        return f"{precision}-zero{zero}-{offload}"
    return f"{precision}-zero{zero}" + ("" if offload == OFFLOAD_NONE else f"-offload-{offload}")


def declared(config) -> tuple[float, float]:
    """The accounting's bytes per parameter at d = D while computing and at the step's peak; offloaded states
    count the GPU's and the host's together (on a CPU they are one memory)."""
    precision, zero, offload = config
    if offload in (OFFLOAD_NONE, FP32_ACCUMULATION):
        pipelined = offload == FP32_ACCUMULATION  # the accounting's row for a pipeline (BF16_Optimizer)
        return (
            ACCOUNTING.state_bytes(precision, zero, pipelined).at(D),
            ACCOUNTING.step_bytes(precision, zero, pipelined).at(D),
        )
    off = ACCOUNTING.offload(precision, zero, offload)
    return off.device.at(D) + off.host.at(D), off.at_step.at(D) + off.host.at(D)


def ds_config(precision: str, zero: int, offload: str = OFFLOAD_NONE) -> dict:
    """What uniap emits for the stage (no pipeline), with every size scaled by SCALE, plus AdamW."""
    strategy = Strategy(1, 2, zero, offload=OFFLOAD_NONE if offload == FP32_ACCUMULATION else offload)
    section = zero_section(strategy, pipeline=False, hidden_size=HIDDEN_FOR_BUCKETS, gpus_per_node=2)
    for key in SIZES:
        if key in section:
            section[key] = round(section[key] * SCALE)
    if "stage3_param_persistence_threshold" in section:
        section["stage3_param_persistence_threshold"] = PERSISTENCE
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": section,
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if offload == FP32_ACCUMULATION:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """One torchrun job of 2 ranks runs every configuration in turn; the per-rank reports by configuration."""
    root = tmp_path_factory.mktemp("deepspeed_memory")
    configs = root / "configs.json"
    configs.write_text(json.dumps({_name(c): ds_config(*c) for c in CONFIGS}, indent=1))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(D),
        str(PROGRAM),
        "--configs",
        str(configs),
        "--out-dir",
        str(root / "out"),
    ]
    start = time.monotonic()
    with (root / "run.log").open("w") as log:
        try:
            rc = subprocess.run(
                cmd, check=False, cwd=TESTS.parent, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {RUN_TIMEOUT} s"
    results = {}
    for config in CONFIGS:
        results[_name(config)] = [
            json.loads(p.read_text()) for p in sorted((root / "out").glob(f"{_name(config)}.rank*.json"))
        ]
    if rc != 0 or any(len(ranks) != D for ranks in results.values()):
        text = (root / "run.log").read_text()
        pytest.fail(f"deepspeed memory run failed: {' '.join(cmd)} -> {rc}\n{text[-8000:]}")
    print(f"deepspeed memory run: {time.monotonic() - start:.1f} s")
    return results


def buckets(snapshot: dict) -> int:
    """Bytes of ZeRO's IPG reduce buckets (stage_1_and_2.py / stage3.py `ipg_buckets`) in a snapshot, and of
    offloading's scratch buffers of the largest parameter (stage_1_and_2.py `temp_grad_buffer_for_*_offload`)."""
    return sum(
        nbytes
        for label, nbytes in snapshot["breakdown"].items()
        if "ipg_buckets" in label or "temp_grad_buffer" in label
    )


def persistent(report: dict) -> int:
    """Bytes of ZeRO-3's persistent parameters held whole (in the model's dtype) on every rank."""
    return report["persistent_numel"] * ITEMSIZE[report["name"].split("-")[0]]


def while_computing(report: dict) -> float:
    """Model-state bytes per parameter while computing: the highest over the micro-batches, less the buffers."""
    snaps = [s for tag, s in report["snapshots"].items() if tag.endswith("_backward")]
    return max(s["held"] - buckets(s) - persistent(report) for s in snaps) / report["nparam"]


def at_step(report: dict) -> float:
    """Model-state bytes per parameter at the optimizer step's peak, less the permanent buffers (ZeRO-3's IPG
    bucket; ZeRO-1/2 free theirs at the end of backward). ZeRO-3 partitions its persistent parameters for the
    step and gathers them again after it (stage3.py), so they are not whole at the peak."""
    before = report["snapshots"]["micro1_backward"]
    step = report["step"]
    # A step that allocates nothing (DeepSpeedCPUAdam on offloaded states) peaks at its start, when ZeRO-3's
    # persistent parameters are still whole.
    whole = persistent(report) if step["peak"] == step["start"] else 0
    return (before["held"] + step["peak"] - step["start"] - buckets(before) - whole) / report["nparam"]


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_runs_what_the_accounting_assumes(runs, config):
    precision, zero, offload = config
    for r in runs[_name(config)]:
        assert r["world_size"] == r["dp_world_size"] == D and r["gradient_accumulation_steps"] == 2
        assert r["zero_stage"] == zero
        offloaded = offload in (OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS)
        assert r["basic_optimizer"] == ("DeepSpeedCPUAdam" if offloaded else "FusedAdam")
        if offload == FP32_ACCUMULATION:
            assert r["wrapper"] == "BF16_Optimizer"
        else:
            assert r["wrapper"] == ("FusedAdam" if (precision, zero) == ("fp32", 0) else WRAPPER[zero])
        assert r["skipped_steps"] == 0 and r["global_steps"] == 2, "a skipped step would not create Adam's moments"
        assert r["largest_param"] <= BUCKET, "every gradient must fit a reduce bucket"
        if zero == 3:
            assert 0 < r["persistent_numel"] < 0.01 * r["nparam"], "the biases stay whole, the weights do not"


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_state_bytes_while_computing(runs, config):
    expected = declared(config)[0]
    for r in runs[_name(config)]:
        measured = while_computing(r)
        assert abs(measured - expected) * r["nparam"] <= SLACK, (
            (
                f"{_name(config)} rank {r['rank']}: measured {measured:.4f} B/param while computing, accounting "
                f"{expected:g}"
            ),
            {tag: s["breakdown"] for tag, s in r["snapshots"].items()},
        )


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_step_peak_bytes(runs, config):
    expected = declared(config)[1]
    for r in runs[_name(config)]:
        step, snaps = r["step"], r["snapshots"]
        held_change = snaps["after_step"]["held"] - snaps["micro1_backward"]["held"]
        assert abs(step["end"] - step["start"] - held_change) <= SLACK, (
            "the profiler missed a free inside the step; its peak is not trustworthy",
            step,
            held_change,
        )
        measured = at_step(r)
        assert abs(measured - expected) * r["nparam"] <= SLACK, (
            (
                f"{_name(config)} rank {r['rank']}: measured {measured:.4f} B/param at the step's peak (in "
                f"{step['peak_op']}), accounting {expected:g}"
            ),
            snaps["micro1_backward"]["breakdown"],
        )


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[1] > 0], ids=_name)
def test_buffers_within_the_accounting(runs, config):
    precision, zero, offload = config
    constant = ACCOUNTING.buffer_elements.get(zero, 0.0) * SCALE
    bound = (constant + ACCOUNTING.buffer_hidden_squares.get(zero, 0.0) * HIDDEN_FOR_BUCKETS**2) * ITEMSIZE[precision]
    if offload in (OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS):  # two scratch buffers of the largest parameter (docstring)
        bound += 2 * 128 * 128 * ITEMSIZE[precision]
    for r in runs[_name(config)]:
        held = [buckets(s) for s in r["snapshots"].values()]
        assert max(held) <= bound, (held, bound)


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_nothing_else_holds_model_states(runs, config):
    """The walk from the engine finds the model states: any other tensor alive (gc) is at most a collective's
    bucket-sized tensor that gloo's worker thread has not let go of yet (the snapshots wait for that, 1 s)."""
    precision = config[0]
    for r in runs[_name(config)]:
        for tag, s in r["snapshots"].items():
            assert s["unreached"] <= 2 * BUCKET * ITEMSIZE[precision], (tag, s["breakdown"])
