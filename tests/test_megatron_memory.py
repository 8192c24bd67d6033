"""megatron-core 0.16.1 really keeps the model-state bytes uniap's Megatron accounting declares.

The planner's memory prediction for a Megatron-LM plan rests on `capability_for('megatron').accounting`:
bytes per parameter of model states per (precision, ZeRO stage) -- bf16 18 / 6 + 12/d with the distributed
optimizer, fp16 20 / 4 + 16/d, fp32 16 / 8 + 8/d -- plus, without Transformer Engine or Apex, the
temporary of torch's foreach AdamW step (FOREACH_ADAM_TEMPORARY bytes per optimizer-local parameter). If
these numbers are wrong, every memory verdict (fits / out of memory) for a Megatron plan is wrong by
that much per parameter. This test measures them on real megatron-core training instead of trusting the
developer guide.

For each configuration -- bf16 and fp16 and fp32 with plain DDP on one rank, and each with the distributed
optimizer on two ranks -- `python -m torch.distributed.run --nproc-per-node d tests/megatron_memory_run.py`
trains a tiny GPTModel on d CPU processes joined by gloo, wrapped the way Megatron-LM trains (Float16Module;
DistributedDataParallel with fp32 gradient buffers for bf16; get_megatron_optimizer), for two steps, and
reports per rank the bytes of all distinct tensor storages held by the parameters, the DDP buffers and the
optimizer after the second step. Where those bytes come from in megatron-core 0.16.1:
- megatron/core/distributed/param_and_grad_buffer.py: one contiguous gradient buffer per dtype
  (fp32 when grad_reduce_in_fp32), every param.main_grad a view into it; with the distributed optimizer
  also one contiguous param buffer that the weights are re-pointed into, both padded (each parameter
  aligned to 64 elements, each bucket to lcm(d, 128) elements);
- megatron/core/distributed/distributed_data_parallel.py: grad dtype float32 if grad_reduce_in_fp32;
- megatron/core/optimizer/optimizer.py: Float16OptimizerWithFloat16Params keeps an fp32 master copy of
  every parameter and, for fp16 gradients, an fp32 copy of them (main_grad.float()) until the next
  zero_grad; FP32Optimizer steps on main_grad in place;
- megatron/core/optimizer/distrib_optimizer.py: the fp32 master copies, fp32 gradient copies and Adam
  moments only for this rank's 1/d shard of the buffer (fp32 parameters are stepped in place on their
  shard of the param buffer);
- megatron/core/optimizer/__init__.py: without TE/Apex the inner optimizer is torch.optim.AdamW, whose
  moments (exp_avg, exp_avg_sq, fp32) appear at the first step.

Checked per rank:
- bytes per (unpadded) parameter of this rank's model == accounting.state_bytes(precision, zero).at(d)
  within 1 %;
- exactly, padding included: the replicated part of the accounting is held in the DDP buffers, so it is
  paid on their padded numel B, and the sharded part on the parameters this rank's optimizer steps (whose
  counts over the ranks add up to N): bytes == replicated * B + sharded * N_local, up to a few hundred bytes
  of scalars (Adam's per-tensor step counters, found_inf); the padding here (224 elements) is larger than
  that slack, so counting the replicated bytes on N instead of B would fail;
- the peak of torch's AdamW.step (its own "Optimizer.step#AdamW.step" profiler record) above its start ==
  FOREACH_ADAM_TEMPORARY * the largest param group's numel (torch's foreach step allocates sqrt(exp_avg_sq)
  for one param group at a time; megatron-core makes a weight-decay group and a small no-decay group for
  the norms) and so FOREACH_ADAM_TEMPORARY per optimizer-local parameter within 1 %;
- without the distributed optimizer, the whole Megatron optimizer.step() (unscale / fp32 gradient copy,
  gradient clipping with the no-TE/Apex fallback, the inner step, copying main params to the model) peaks
  by that temporary and no more above what stays resident after it.

Measured (N = 955,680): 18.0001 / 12.0021 / 20.0001 / 12.0018 / 16.0001 / 12.0023 bytes per parameter for
bf16 DDP d=1 / bf16 distributed d=2 / fp16 DDP / fp16 distributed / fp32 DDP / fp32 distributed (rank 0),
36-84 bytes above the padded-exact figure; AdamW.step's peak = 4 * the largest group's numel + 12 bytes.

Left out: the whole-step peak with the distributed optimizer. Its parameter all-gather (start_param_sync
inside optimizer.step) writes in place into the param buffer with NCCL, but gloo's all-gather allocates a
temporary of the whole param buffer on the CPU, which can exceed the foreach temporary (fp32, d = 2: the
step peaks at twice it); the CPU number would test gloo, not megatron-core. The foreach path is forced in
the program (torch takes it by default on a GPU, not on a CPU) and measured with torch.profiler's CPU
allocation events, which count every allocation of the step on a CPU; the numbers are exact and repeatable
there (the same bytes in every run so far).
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

# Checked without importing them here (importing megatron-core costs seconds; the ranks import it).
if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed (the measurement trains with megatron-core)", allow_module_level=True)
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)

from uniap.cost.accounting import FOREACH_ADAM_TEMPORARY
from uniap.cost.strategy import capability_for

TESTS = Path(__file__).parent
PROGRAM = TESTS / "megatron_memory_run.py"
RUN_TIMEOUT = 300  # seconds for all launches together: ~35-60 s in parallel on 2 busy CPU cores (65 s of CPU)
SCALAR_SLACK = 256  # bytes: Adam's per-tensor fp32 step counters, found_inf / loss-scale scalars
ALLOC_SLACK = 4096  # bytes: the foreach step's small allocations besides sqrt(exp_avg_sq)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:megatron")]

# (precision, data-parallel size, distributed optimizer = ZeRO stage 1)
CONFIGS = [
    ("bf16", 1, False),
    ("bf16", 2, True),
    ("fp16", 1, False),
    ("fp16", 2, True),
    ("fp32", 1, False),
    ("fp32", 2, True),
]


def _name(config) -> str:
    precision, d, distopt = config
    return f"{precision}-d{d}-{'distopt' if distopt else 'ddp'}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Launch every configuration at once (separate torchrun jobs, each on its own free port) and collect
    the per-rank results."""
    root = tmp_path_factory.mktemp("megatron_memory")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    procs = {}
    start = time.monotonic()
    for config in CONFIGS:
        precision, d, distopt = config
        out = root / _name(config)
        out.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(d),
            str(PROGRAM),
            "--precision",
            precision,
            "--out-dir",
            str(out),
        ]
        if distopt:
            cmd.append("--distributed-optimizer")
        log = (root / f"{_name(config)}.log").open("w")
        procs[config] = (
            subprocess.Popen(cmd, cwd=TESTS.parent, env=env, stdout=log, stderr=subprocess.STDOUT),
            cmd,
            out,
            log,
        )
    results, failures = {}, []
    for config, (proc, cmd, out, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = f"timeout after {RUN_TIMEOUT} s"
        log.close()
        ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
        if rc != 0 or len(ranks) != config[1]:
            text = Path(log.name).read_text()
            failures.append(f"{' '.join(cmd)} -> {rc}\n{text[-8000:]}")
        results[_name(config)] = ranks
    if failures:
        pytest.fail("megatron memory run failed:\n" + "\n\n".join(failures))
    return results


def _expected(config):
    precision, _d, distopt = config
    return capability_for("megatron").accounting.state_bytes(precision, 1 if distopt else 0)


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_runs_megatron_as_megatron_lm_does(runs, config):
    for r in runs[_name(config)]:
        assert r["dp"] == config[1] and r["distributed_optimizer"] == config[2]
        assert r["steps_successful"] == [True, True], "a skipped step would not create Adam's moments"
        assert r["inner_optimizer"] == ["torch.optim.adamw.AdamW"] and r["foreach"]


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_state_bytes_per_parameter_match_the_accounting(runs, config):
    d = config[1]
    per_param = _expected(config)
    for r in runs[_name(config)]:
        measured = r["state_bytes"] / r["nparam"]
        assert measured == pytest.approx(per_param.at(d), rel=0.01), (r["state_breakdown"], r["nparam"])


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_state_bytes_exact_with_padding(runs, config):
    """Replicated bytes on the (padded) DDP buffers, sharded bytes on this rank's optimizer parameters."""
    _precision, d, distopt = config
    per_param = _expected(config)
    ranks = runs[_name(config)]
    nparam = ranks[0]["nparam"]
    assert sum(r["optimizer_numel"] for r in ranks) == (nparam if distopt else d * nparam)
    for r in ranks:
        buffer = r["grad_buffer_numel"]
        if distopt:
            assert r["param_buffer_numel"] == buffer >= nparam and buffer % d == 0
            assert buffer - nparam < 0.005 * nparam, "padding is small for this model"
        else:
            assert r["param_buffer_numel"] == 0 and buffer == nparam == r["optimizer_numel"]
        exact = per_param.replicated * buffer + per_param.sharded * r["optimizer_numel"]
        assert 0 <= r["state_bytes"] - exact <= SCALAR_SLACK, (r["state_bytes"], exact, r["state_breakdown"])


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_foreach_adam_temporary(runs, config):
    for r in runs[_name(config)]:
        largest_group = max(r["optimizer_group_numel"])
        assert 0 <= r["inner_step_peak_bytes"] - FOREACH_ADAM_TEMPORARY * largest_group <= ALLOC_SLACK
        assert r["inner_step_peak_bytes"] == pytest.approx(FOREACH_ADAM_TEMPORARY * r["optimizer_numel"], rel=0.01)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c[2]], ids=_name)
def test_megatron_step_transient_is_the_foreach_temporary(runs, config):
    """Without the distributed optimizer nothing else in Megatron's step (fp32 gradient copy for fp16,
    clipping, copying main params back) outgrows the foreach temporary above what stays resident."""
    for r in runs[_name(config)]:
        transient = r["step_peak_bytes"] - r["step_end_bytes"]
        assert transient == pytest.approx(FOREACH_ADAM_TEMPORARY * r["optimizer_numel"], rel=0.01), r
