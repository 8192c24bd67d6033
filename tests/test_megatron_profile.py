"""`uniap-megatron profile` for real on the CPU: megatron-core layers, an optimizer step and a whole-model
calibration run, torch.distributed over gloo, torchrun. No mocks and no test shim: each run is a subprocess
of the product code (~10 s each)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from processes import child_env

pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from uniap.profile.runner import free_port
from uniap.cli import main as uniap_main
from uniap.model import TrainingSpec, build_graph, load_model
from uniap.profile import Profile

FAST = ["--seq-length", "32", "--warmup", "1", "--repeats", "2", "--collective-sizes-mb", "0.25"]


def _single(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = child_env(CUDA_VISIBLE_DEVICES="")
    env["MASTER_PORT"] = str(free_port())
    return subprocess.run(
        [sys.executable, "-m", "uniap_megatron.profile", *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _signatures(yaml_path, flash: bool = True) -> dict[str, str]:
    """kind -> signature of the tiny model's layers at seq 32 (one signature per kind)."""
    training = TrainingSpec(global_batch_size=4, seq_length=32, flash_attention=flash)
    graph = build_graph(load_model(str(yaml_path)), training)
    sigs: dict[str, set] = {}
    for layer in graph.layers:
        sigs.setdefault(layer.kind, set()).add(layer.signature)
    assert all(len(v) == 1 for v in sigs.values())
    return {kind: v.pop() for kind, v in sigs.items()}


def _transformer_signature(yaml_path) -> str:
    return _signatures(yaml_path)["transformer"]


@pytest.mark.slow  # ~10-20 s: a profiler subprocess
def test_single_process_profile_feeds_the_planner(tiny, tmp_path):
    """Embedding, transformer layer and LM head timed per micro-batch size, an optimizer step, a calibration
    fitted to a whole-model run, notes naming what ran; the planner takes it."""
    out = tmp_path / "profile.json"
    proc = _single(["--model", str(tiny), "--micro-batch-sizes", "1,2", *FAST, "-o", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = Profile.load(out)
    assert profile.runtime.startswith("megatron-core ")
    assert profile.device.startswith("cpu (")
    assert "testing" in profile.notes
    assert profile.collectives == []  # one rank: nothing to measure
    sigs = _signatures(tiny)
    assert set(profile.layers) == set(sigs.values())  # embedding, transformer, head
    for sig in sigs.values():
        timings = {t.micro_batch_size: t for t in profile.layers[sig] if t.tp == 1}
        assert set(timings) == {1, 2}, sig
        for t in timings.values():
            assert t.forward_ms > 0 and t.backward_ms > 0 and t.activation_bytes is None

    notes = profile.notes
    assert "local spec (get_gpt_layer_local_spec)" in notes
    assert "attention SDPA (flash when the GPU/dtype allow)" in notes
    assert "norm LayerNorm: torch LayerNorm" in notes

    layer = next(
        x
        for x in build_graph(load_model(str(tiny)), TrainingSpec(global_batch_size=4, seq_length=32)).layers
        if x.kind == "transformer"
    )
    opt = profile.optimizer
    assert opt is not None and opt.implementation == "torch.optim.AdamW (for-loop)"
    assert opt.num_params == layer.params and opt.step_ms > 0 and opt.extra_peak_bytes is None

    cal = profile.calibration
    assert cal is not None and len(cal.runs) == 1 and cal.reserved_per_allocated is None
    run = cal.runs[0]
    assert abs(run.fitted_time_s - run.measured_time_s) <= 1e-6 * run.measured_time_s
    assert run.job["target"] == "megatron" and run.job["micro_batches"] == 2 and run.job["strategy"]
    assert run.measured_peak_bytes is None
    assert cal.source.startswith("uniap-megatron profile: megatron-core ")
    assert "calibration: whole-model run of megatron-core GPTModel of 2 layer(s)" in notes
    assert "in megatron-core DistributedOptimizer" in notes

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = uniap_main(
            [
                "plan",
                "--model",
                str(tiny),
                "--gpus-per-node",
                "2",
                "--profile",
                str(out),
                "--tp",
                "1",
                "--seq-length",
                "32",
                "--global-batch-size",
                "4",
                "--target",
                "megatron",
                "--json",
            ]
        )
    assert rc == 0
    plan = json.loads(buf.getvalue())
    assert plan["basis"]["compute"].startswith("measured")  # every layer measured, then calibrated


@pytest.mark.slow  # ~10-20 s: a profiler subprocess
def test_no_flash_attention_profiles_the_unfused_kernel(tiny, tmp_path):
    out = tmp_path / "profile.json"
    proc = _single(
        [
            "--model",
            str(tiny),
            "--micro-batch-sizes",
            "1",
            "--no-flash-attention",
            "--calibration-layers",
            "0",
            *FAST,
            "-o",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = Profile.load(out)
    sigs = _signatures(tiny, flash=False)
    assert set(profile.layers) == set(sigs.values())
    assert not any("/flash" in sig for sig in profile.layers)
    assert "attention SDPA math backend (unfused; megatron-core DotProductAttention needs CUDA)" in profile.notes
    assert "flash when" not in profile.notes
    assert profile.calibration is None and "calibration" not in profile.notes


@pytest.mark.slow  # ~10-20 s: a profiler subprocess
def test_two_processes_under_torchrun_measure_tp2_and_collectives(tiny, tmp_path):
    out = tmp_path / "profile.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "uniap_megatron.profile",
        "--model",
        str(tiny),
        "--micro-batch-sizes",
        "1",
        "--tp-degrees",
        "1,2",
        *FAST,
        "-o",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=child_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = Profile.load(out)
    assert profile.backend == "gloo"
    for sig in _signatures(tiny).values():
        assert {t.tp for t in profile.layers[sig]} == {1, 2}, sig
    timings = profile.layers[_transformer_signature(tiny)]
    assert all(t.forward_ms > 0 and t.backward_ms > 0 for t in timings)
    ops = {c.op: c for c in profile.collectives}
    assert {"all_reduce", "p2p"} <= set(ops)
    assert ops["all_reduce"].group_size == 2 and ops["all_reduce"].scope == "intra_node"
    assert ops["p2p"].bus_bandwidth_gbps > 0
    assert profile.optimizer is not None
    assert profile.calibration is None and "not calibrated: the calibration run needs one process" in profile.notes


@pytest.mark.slow  # real processes
def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("{}")
    proc = _single(["--model", str(tiny), *FAST, "-o", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "exists" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "{}"


def test_cli_delegates_profile(tiny, tmp_path, capsys):
    from uniap_megatron.cli import main

    out = tmp_path / "profile.json"
    out.write_text("{}")
    assert main(["profile", "--model", str(tiny), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
