"""`uniap-deepspeed profile` for real on the CPU: DeepSpeed engines, deepspeed.comm over gloo, torchrun.

No mocks: each test runs the profiler in a subprocess with DS_ACCELERATOR=cpu. DeepSpeed's CPU
accelerator JIT-builds its shared-memory comm op on the first init_distributed of a machine (about
90 s once, cached under ~/.cache/torch_extensions); after that the whole file takes ~30-45 s.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from processes import child_env
from sweep import sampled
from uniap.profile.runner import free_port
from uniap.cli import main as uniap_main
from uniap.model import TrainingSpec, build_graph, load_model
from uniap.profile import Profile

from uniap_deepspeed.profile import CPU_NOTE  # importing it needs no torch

pytest.importorskip("torch")
pytest.importorskip("deepspeed")


def _single(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = child_env(DS_ACCELERATOR="cpu")
    env["MASTER_PORT"] = str(free_port())
    return subprocess.run(
        [sys.executable, "-m", "uniap_deepspeed.profile", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _plan(yaml_path, profile_path, *extra, command="plan") -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = uniap_main(
            [
                command,
                "--model",
                str(yaml_path),
                "--cluster",
                "dgx-a100-80g",
                "--gpus-per-node",
                "2",
                "--profile",
                str(profile_path),
                "--seq-length",
                "32",
                "--global-batch-size",
                "4",
                "--json",
                *extra,
            ]
        )
    assert rc == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_single_process_profile_feeds_the_planner(tiny, tmp_path):
    out = tmp_path / "profile.json"
    proc = _single(
        [
            "--model",
            str(tiny),
            "--seq-length",
            "32",
            "--micro-batch-sizes",
            "1,2",
            "--warmup",
            "1",
            "--repeats",
            "3",
            "-o",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    profile = Profile.load(out)
    assert profile.backend == "gloo"
    assert profile.runtime.startswith("deepspeed 0.")
    assert profile.device.startswith("cpu (")
    assert CPU_NOTE in profile.notes
    assert profile.collectives == []  # one rank: nothing to communicate with

    graph = build_graph(load_model(str(tiny)), TrainingSpec(global_batch_size=4, seq_length=32))
    transformer = {layer.signature for layer in graph.layers if layer.kind == "transformer"}
    assert len(transformer) == 1
    assert transformer <= set(profile.layers)
    # Embedding and head are timed too: every signature of the graph is in the profile.
    assert {layer.signature for layer in graph.layers} == set(profile.layers)
    for timings in profile.layers.values():
        assert sorted(t.micro_batch_size for t in timings) == [1, 2]
        for t in timings:
            assert t.tp == 1 and t.forward_ms > 0 and t.backward_ms > 0
            assert t.activation_bytes is None  # measured only with a CUDA allocator

    # One engine.step() over a transformer layer's parameters (the layer module itself), torch's AdamW on the CPU.
    layer = next(layer for layer in graph.layers if layer.kind == "transformer")
    optimizer = profile.optimizer
    assert optimizer is not None and optimizer.implementation.startswith("torch.optim.AdamW")
    assert optimizer.num_params == layer.params_tp + layer.params_rep
    assert optimizer.step_ms > 0
    assert optimizer.extra_peak_bytes is None  # measured only with a CUDA allocator

    # The whole-model run (2 layers, micro-batch 1 = the smallest, 2 micro-batches) calibrated the profile.
    calibration = profile.calibration
    assert calibration is not None, profile.notes  # the notes say why not
    assert calibration.source.startswith("uniap-deepspeed profile")
    assert calibration.reserved_per_allocated is None  # no CUDA peaks to fit
    (run,) = calibration.runs
    assert run.job["target"] == "deepspeed" and run.job["model"] == "tiny-2l" and run.job["gpus"] == 1
    assert (run.job["micro_batches"], run.job["global_batch_size"]) == (2, 2)
    assert run.measured_time_s > 0
    assert abs(run.fitted_time_s - run.measured_time_s) <= 1e-6 * run.measured_time_s
    assert "calibration: whole-model run of tiny-2l" in profile.notes

    # DeepSpeed's own target plans TP=1 only, all of which the profile measured, scaled by the calibration.
    scaled = f" x{calibration.compute_scale:.3g} calibrated"
    assert _plan(tiny, out, "--target", "deepspeed")["basis"]["compute"] == "measured" + scaled
    # The generic target also prices TP=2 layers, which a DeepSpeed profile (tp=1) cannot hold. (Whether its
    # optimal plan uses any depends on how fast the CPU timed the layers: price TP=2 directly.)
    tp2 = _plan(tiny, out, "--tp", "2", "--micro-batch-size", "2", command="evaluate")
    assert tp2["basis"]["compute"] == "estimated" + scaled


@pytest.mark.slow
def test_two_processes_under_torchrun_measure_collectives(tiny, tmp_path):
    out = tmp_path / "profile2.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "uniap_deepspeed.profile",
        "--model",
        str(tiny),
        "--seq-length",
        "32",
        "--micro-batch-sizes",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--collective-sizes-mb",
        "1,2",
        "-o",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=child_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    profile = Profile.load(out)
    assert profile.backend == "gloo"
    ops = {c.op: c for c in profile.collectives}
    assert {"all_reduce", "p2p"} <= set(ops)
    assert {"all_gather", "reduce_scatter"} <= set(ops)  # gloo runs both in this torch
    for c in profile.collectives:
        assert c.group_size == 2 and c.scope == "intra_node" and c.bus_bandwidth_gbps > 0
    assert profile.layers  # both ranks timed the layers; rank 0 wrote them
    assert profile.optimizer is not None
    # Both ranks trained the calibration model as two data-parallel replicas. Two ranks sharing a loaded CPU can
    # time a layer or step far off; then the fit (compute 0.2x .. 5x as slow as predicted) declines, and says so.
    if profile.calibration is None:
        assert "not calibrated: deepspeed tiny-2l mbs 1x2: the measured" in profile.notes, profile.notes
    else:
        (run,) = profile.calibration.runs
        assert (run.job["gpus"], run.job["strategy"], run.job["global_batch_size"]) == (2, "DP2", 4)
        assert abs(run.fitted_time_s - run.measured_time_s) <= 1e-6 * run.measured_time_s

    basis = _plan(tiny, out, "--target", "deepspeed")["basis"]
    assert basis["compute"].startswith("measured")
    assert basis["communication"] == "measured"


@pytest.mark.slow  # real processes
def test_existing_output_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("keep me\n")
    before = out.stat().st_mtime_ns
    proc = _single(["--model", str(tiny), "--seq-length", "32", "-o", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "exists" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "keep me\n" and out.stat().st_mtime_ns == before


@pytest.mark.slow
def test_calibration_layers_0_skips_the_training_run(tiny, tmp_path):
    out = tmp_path / "profile.json"
    proc = _single(
        [
            "--model",
            str(tiny),
            "--seq-length",
            "32",
            "--micro-batch-sizes",
            "1",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--calibration-layers",
            "0",
            "-o",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    profile = Profile.load(out)
    assert profile.calibration is None
    assert profile.optimizer is not None and profile.optimizer.step_ms > 0  # one warm-up step even with --warmup 0


@pytest.mark.slow  # real processes
@pytest.mark.parametrize(
    "args, words",
    sampled(
        [
            (["--model", "no-such-model"], "unknown model preset"),
            (["--model", "TINY", "--seq-length", "64"], "max_position_embeddings"),
            (["--model", "TINY", "--micro-batch-sizes", "0"], "positive"),
            (["--model", "TINY", "--calibration-layers", "-1"], "--calibration-layers must be >= 0"),
            (["--model", "TINY", "--calibration-micro-batches", "0"], "--calibration-micro-batches must be >= 1"),
        ],
        keep_every=3,
    ),
)
def test_user_errors_exit_2_without_traceback(tiny, tmp_path, args, words):
    args = [str(tiny) if a == "TINY" else a for a in args]
    proc = _single([*args, "-o", str(tmp_path / "p.json")], tmp_path)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p.json").exists()
