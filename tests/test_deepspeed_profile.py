"""`uniap-deepspeed profile` for real on the CPU: DeepSpeed engines, deepspeed.comm over gloo, torchrun.

No mocks: each test runs the profiler in a subprocess with DS_ACCELERATOR=cpu. DeepSpeed's CPU
accelerator JIT-builds its shared-memory comm op on the first init_distributed of a machine (about
90 s once, cached under ~/.cache/torch_extensions); after that the whole file takes ~20-30 s.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from uniap.cli import main as uniap_main  # noqa: E402
from uniap.model import TrainingSpec, build_graph, load_model  # noqa: E402
from uniap.profile import Profile  # noqa: E402
from uniap_deepspeed.profile import CPU_NOTE  # noqa: E402

TINY = """\
name: tiny
architecture: decoder
num_layers: 2
hidden_size: 64
num_attention_heads: 4
ffn_hidden_size: 128
vocab_size: 100
max_position_embeddings: 32
"""
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _single(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = _env()
    env["MASTER_PORT"] = str(_free_port())
    return subprocess.run([sys.executable, "-m", "uniap_deepspeed.profile", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _plan(yaml_path, profile_path, *extra) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = uniap_main(["plan", "--model", str(yaml_path), "--cluster", "dgx-a100-80g", "--gpus-per-node", "2",
                         "--profile", str(profile_path), "--seq-length", "32", "--global-batch-size", "4", "--json",
                         *extra])
    assert rc == 0
    return json.loads(out.getvalue())


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_single_process_profile_feeds_the_planner(tiny, tmp_path):
    out = tmp_path / "profile.json"
    proc = _single(["--model", str(tiny), "--seq-length", "32", "--micro-batch-sizes", "1,2", "--warmup", "1",
                    "--repeats", "2", "-o", str(out)], tmp_path)
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

    # DeepSpeed's own target plans TP=1 only, all of which the profile measured.
    assert _plan(tiny, out, "--target", "deepspeed")["basis"]["compute"] == "measured"
    # The generic target also prices TP=2 layers, which a DeepSpeed profile (tp=1) cannot hold.
    assert _plan(tiny, out)["basis"]["compute"] == "mixed"


def test_two_processes_under_torchrun_measure_collectives(tiny, tmp_path):
    out = tmp_path / "profile2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "uniap_deepspeed.profile", "--model", str(tiny),
           "--seq-length", "32", "--micro-batch-sizes", "1", "--warmup", "1", "--repeats", "2",
           "--collective-sizes-mb", "1,2", "-o", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    profile = Profile.load(out)
    assert profile.backend == "gloo"
    ops = {c.op: c for c in profile.collectives}
    assert {"all_reduce", "p2p"} <= set(ops)
    assert {"all_gather", "reduce_scatter"} <= set(ops)  # gloo runs both in this torch
    for c in profile.collectives:
        assert c.group_size == 2 and c.scope == "intra_node" and c.bus_bandwidth_gbps > 0
    assert profile.layers  # both ranks timed the layers; rank 0 wrote them

    basis = _plan(tiny, out, "--target", "deepspeed")["basis"]
    assert basis["compute"] == "measured"
    assert basis["communication"] == "measured"


def test_existing_output_is_not_overwritten(tiny, tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("keep me\n")
    before = out.stat().st_mtime_ns
    proc = _single(["--model", str(tiny), "--seq-length", "32", "-o", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "exists" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "keep me\n" and out.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, words", [
    (["--model", "no-such-model"], "unknown model preset"),
    (["--model", "TINY", "--seq-length", "64"], "max_position_embeddings"),
    (["--model", "TINY", "--micro-batch-sizes", "0"], "positive"),
])
def test_user_errors_exit_2_without_traceback(tiny, tmp_path, args, words):
    args = [str(tiny) if a == "TINY" else a for a in args]
    proc = _single([*args, "-o", str(tmp_path / "p.json")], tmp_path)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p.json").exists()
