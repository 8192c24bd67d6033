"""`uniap-megatron` (args / run / script) and the Megatron launch templates.

Megatron-LM is not installed, so nothing here trains: `run --dry-run` is checked through the command it
prints (shlex-parsed back to tokens), the templates through `bash -n` and by running them with stub
`torchrun` / `srun` / `scontrol` / `python` executables that record the argv and environment they get,
and one real `run` spawns torchrun (CPU) on a two-line script that records its argv and environment.
Planning jobs are a tiny GPT on 2 GPUs (well under a second each).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from megatron_argv import TINY_JOB_ARGV
from uniap.plan import Plan

from uniap_megatron.args import megatron_launch, model_args
from uniap_megatron.cli import main
from uniap_megatron.launch import LAUNCH_KINDS, launch_script
from uniap_megatron.merge import merged_argv
from uniap_megatron.planning import plan_megatron

NASTY = ["--data-path", 'my data/it\'s "here" $HOME `id`', "--tokenizer-model", "a;b|c&d > e"]
VENV_BIN = Path(sys.executable).parent


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def command_line(out: str) -> list[str]:
    """The line after `command:` in run's output, shlex-parsed."""
    lines = out.splitlines()
    return shlex.split(lines[lines.index("command:") + 1])


def assert_clean_error(rc: int, err: str, code: int = 2) -> None:
    assert rc == code, err
    assert err.startswith("uniap-megatron: error:") or "error:" in err
    assert "Traceback" not in err


# --- run --dry-run ---------------------------------------------------------------------------------


def test_run_dry_run_prints_plan_and_torchrun_command(capsys, tmp_path):
    user = [*TINY_JOB_ARGV, "--tensor-model-parallel-size", "2", *NASTY]
    plan_out = tmp_path / "plan.json"
    rc, out, err = run_main(
        capsys,
        "run",
        "--dry-run",
        "--nproc-per-node",
        "2",
        "--plan-out",
        str(plan_out),
        "--",
        "pretrain_gpt.py",
        "--auto-parallel",
        *user,
    )
    assert rc == 0, err
    assert "uniap-megatron plan:" in out and "pipeline degree" in out and "pinned: TP 2" in out
    plan = Plan.load(plan_out)
    launch = megatron_launch(plan)
    tokens = command_line(out)
    assert tokens[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1"  # TP > 1
    assert Path(tokens[1]).name == "torchrun"
    assert tokens[2:7] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
    assert tokens[7] == "pretrain_gpt.py"
    script_args = tokens[8:]
    assert "--auto-parallel" not in script_args
    assert script_args[: len(user)] == user  # every explicit flag kept, verbatim and in order
    added = script_args[len(user) :]
    assert added == ["--pipeline-model-parallel-size", "1", "--micro-batch-size", "8", "--sequence-parallel"]
    assert set(added) <= set(launch.args)


def test_run_dry_run_unpinned_adds_all_plan_flags(capsys, tmp_path):
    plan_out = tmp_path / "plan.json"
    rc, out, err = run_main(
        capsys,
        "run",
        "--dry-run",
        "--nproc-per-node",
        "2",
        "--plan-out",
        str(plan_out),
        "--",
        "pretrain_gpt.py",
        "--auto-parallel",
        *TINY_JOB_ARGV,
    )
    assert rc == 0, err
    plan = Plan.load(plan_out)
    launch = megatron_launch(plan)
    tokens = command_line(out)
    i = tokens.index("pretrain_gpt.py")
    # --global-batch-size and --bf16 come from the user's command line, so the plan does not repeat them.
    expected = [t for t in launch.args if t not in ("--bf16",)]
    gbs = expected.index("--global-batch-size")
    del expected[gbs : gbs + 2]
    assert tokens[i + 1 :] == [*TINY_JOB_ARGV, *expected]
    assert (tokens[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1") == bool(launch.env)


def test_run_honours_the_scripts_auto_parallel_options(capsys, tmp_path):
    plan_out = tmp_path / "plan.json"
    rc, out, err = run_main(
        capsys,
        "run",
        "--dry-run",
        "--nproc-per-node",
        "2",
        "--plan-out",
        str(plan_out),
        "--",
        "pretrain_gpt.py",
        *TINY_JOB_ARGV,
        "--auto-parallel",
        "--auto-parallel-cluster",
        "dgx-h100",
        "--auto-parallel-time-limit=30",
        "--auto-parallel-dry-run",
    )
    assert rc == 0, err
    assert Plan.load(plan_out).cluster.name == "dgx-h100"
    assert not any(t.startswith("--auto-parallel") for t in command_line(out))


def test_run_with_saved_plan_and_multi_node(capsys, tmp_path):
    plan = plan_megatron(TINY_JOB_ARGV, 2, 1)
    path = tmp_path / "plan.json"
    plan.save(path)
    rc, out, err = run_main(
        capsys,
        "run",
        "--dry-run",
        "--plan",
        str(path),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--",
        "pretrain_gpt.py",
        *TINY_JOB_ARGV,
    )
    assert rc == 0, err
    tokens = command_line(out)
    i = next(k for k, t in enumerate(tokens) if t.endswith("torchrun"))
    assert tokens[i + 1 : i + 12] == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29500",
        "pretrain_gpt.py",
    ]


def test_run_writes_a_slurm_script(capsys, tmp_path):
    out_file = tmp_path / "job.sbatch"
    argv = [
        "run",
        "--slurm",
        str(out_file),
        "--nproc-per-node",
        "2",
        "--job-name",
        "tiny 'gpt'",
        "--",
        "pretrain_gpt.py",
        "--auto-parallel",
        *TINY_JOB_ARGV,
        "--tensor-model-parallel-size",
        "2",
        *NASTY,
    ]
    rc, out, err = run_main(capsys, *argv)
    assert rc == 0, err
    text = out_file.read_text()
    assert "#SBATCH --nodes=1\n" in text and "#SBATCH --gres=gpu:2\n" in text
    assert "#SBATCH --ntasks-per-node=1\n" in text
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1\n" in text
    assert "--auto-parallel" not in text
    assert subprocess.run(["bash", "-n", str(out_file)], capture_output=True).returncode == 0
    assert os.access(out_file, os.X_OK)
    # Not overwritten without --force.
    rc, out, err = run_main(capsys, *argv)
    assert_clean_error(rc, err)
    assert "exists; not overwriting" in err
    rc, _, err = run_main(capsys, *argv[:1], "--force", *argv[1:])
    assert rc == 0, err


def test_run_slurm_task_per_gpu_mode(capsys, tmp_path):
    out_file = tmp_path / "job.sbatch"
    rc, out, err = run_main(
        capsys,
        "run",
        "--slurm",
        str(out_file),
        "--slurm-mode",
        "task-per-gpu",
        "--nproc-per-node",
        "2",
        "--",
        "pretrain_gpt.py",
        *TINY_JOB_ARGV,
    )
    assert rc == 0, err
    text = out_file.read_text()
    assert "#SBATCH --ntasks-per-node=2\n" in text and 'RANK="$SLURM_PROCID"' in text
    assert subprocess.run(["bash", "-n", str(out_file)], capture_output=True).returncode == 0


# --- args ------------------------------------------------------------------------------------------


def test_args_prints_plan_arguments_and_env(capsys, tmp_path):
    plan = plan_megatron([*TINY_JOB_ARGV, "--tensor-model-parallel-size", "2"], 1, 2)
    path = tmp_path / "plan.json"
    plan.save(path)
    rc, out, err = run_main(capsys, "args", str(path))
    assert rc == 0, err
    lines = out.splitlines()
    launch = megatron_launch(plan)
    assert shlex.split(lines[0]) == launch.args
    assert lines[1:] == ["export CUDA_DEVICE_MAX_CONNECTIONS=1"]
    rc, out, err = run_main(capsys, "args", str(path), "--with-model")
    assert rc == 0, err

    words = shlex.split(out.splitlines()[0])
    assert words == model_args(plan.model, plan.training) + launch.args
    assert words[:2] == ["--num-layers", "4"]


def test_args_of_a_plan_megatron_cannot_run(capsys, tmp_path):
    from uniap.cli import main as uniap_main

    path = tmp_path / "generic.json"
    # A generic plan with ZeRO-2 (Megatron has none) is refused with the reason.
    assert (
        uniap_main(
            [
                "evaluate",
                "--model",
                "gpt3-1.3b",
                "--gpus-per-node",
                "2",
                "--global-batch-size",
                "8",
                "--seq-length",
                "256",
                "--zero",
                "2",
                "-o",
                str(path),
            ]
        )
        == 0
    )
    rc, out, err = run_main(capsys, "args", str(path))
    assert_clean_error(rc, err)
    assert "not runnable by Megatron-LM" in err


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--dry-run"], "no training script given"),
        (["run", "--dry-run", "--", "--num-layers", "4"], "must be the training script"),
        (
            ["run", "--dry-run", "--nproc-per-node", "2", "--", "pretrain_gpt.py", "--hidden-size", "64"],
            "--num-layers is required",
        ),
        (
            ["run", "--dry-run", "--cluster", "nope", "--", "pretrain_gpt.py", *TINY_JOB_ARGV],
            "unknown cluster preset 'nope'",
        ),
        (
            [
                "run",
                "--dry-run",
                "--nproc-per-node",
                "2",
                "--time-limit",
                "-1",
                "--",
                "pretrain_gpt.py",
                *TINY_JOB_ARGV,
            ],
            "time limit must be a positive number of seconds",
        ),
        (
            [
                "run",
                "--dry-run",
                "--nproc-per-node",
                "2",
                "--",
                "pretrain_gpt.py",
                *TINY_JOB_ARGV,
                "--tensor-model-parallel-size",
                "3",
            ],
            "--tensor-model-parallel-size 3 does not divide",
        ),
        (
            ["run", "--dry-run", "--nnodes", "2", "--nproc-per-node", "1", "--", "pretrain_gpt.py", *TINY_JOB_ARGV],
            "needs --master-addr",
        ),
        (["args", "missing.json"], "cannot read plan file"),
        (["script", "missing.json", "--", "pretrain_gpt.py"], "cannot read plan file"),
    ],
)
def test_errors_exit_2_without_traceback(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(capsys, *argv)
    assert_clean_error(rc, err)
    assert message in err


def test_console_script_error_has_no_traceback(tmp_path):
    exe = VENV_BIN / "uniap-megatron"
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    r = subprocess.run([str(exe), "args", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("uniap-megatron: error: cannot read plan file")


def run_bash(path: Path, *args: str) -> None:
    r = subprocess.run(["bash", str(path), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- templates -------------------------------------------------------------------------------------

STUB_RECORDER = """#!{python}
import json, os, sys
out = os.environ["STUB_OUT"]
n = len(os.listdir(out))
keys = ("CUDA_DEVICE_MAX_CONNECTIONS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
        "MASTER_PORT")
with open(os.path.join(out, "%03d.json" % n), "w") as fh:
    json.dump({{"name": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
               "env": {{k: os.environ.get(k) for k in keys}}}}, fh)
"""
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=2
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
printf 'node-a\\nnode-b\\n'
seq 1 20000 | sed 's/^/node-/'  # a long list: `| head -n 1` under pipefail would die of SIGPIPE
"""


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """A bin dir with recording torchrun/python and fake srun/scontrol, first on PATH."""
    bin_dir, out = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (
        ("torchrun", STUB_RECORDER.format(python=sys.executable)),
        ("fakepython", STUB_RECORDER.format(python=sys.executable)),
        ("srun", SRUN),
        ("scontrol", SCONTROL),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_OUT", str(out))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node-[a-b]")
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)

    def calls() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(out.iterdir())]

    return bin_dir, calls


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    return {
        "tp2": plan_megatron([*TINY_JOB_ARGV, "--tensor-model-parallel-size", "2"], 1, 2),
        "tp1": plan_megatron([*TINY_JOB_ARGV, "--tensor-model-parallel-size", "1"], 1, 2),
        "2x1": plan_megatron(TINY_JOB_ARGV, 2, 1),
    }


def render_and_check(tmp_path: Path, kind: str, plan: Plan, user: list[str], **kw) -> tuple[Path, list[str]]:
    final, merge = merged_argv(plan, user)
    command = ["my dir/pretrain gpt.py", *final]
    text = launch_script(kind, plan, command, env=merge.env, **kw)
    path = tmp_path / f"{kind}.sh"
    path.write_text(text)
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return path, command


@pytest.mark.parametrize("kind", list(LAUNCH_KINDS))
def test_every_template_renders_quoted_values_and_passes_bash_n(tmp_path, plans, kind):
    plan = plans["2x1"] if kind != "single-node" else plans["tp2"]
    path, _ = render_and_check(
        tmp_path,
        kind,
        plan,
        [*TINY_JOB_ARGV, *NASTY],
        master_addr="head node'1",
        job_name="job 'x' $(id)",
        python="/opt/my python/bin/python",
    )
    text = path.read_text()
    assert "head node'1" not in text and "job 'x'" not in text  # every value arrives shell-quoted
    assert ("export CUDA_DEVICE_MAX_CONNECTIONS=1" in text) == bool(megatron_launch(plan).env)


def test_env_export_only_when_the_plan_needs_it(tmp_path, plans):
    with_tp, _ = render_and_check(tmp_path, "single-node", plans["tp2"], TINY_JOB_ARGV)
    assert "\nexport CUDA_DEVICE_MAX_CONNECTIONS=1\n" in with_tp.read_text()
    (tmp_path / "b").mkdir()
    without, _ = render_and_check(tmp_path / "b", "single-node", plans["tp1"], TINY_JOB_ARGV)
    assert "export CUDA_DEVICE_MAX_CONNECTIONS" not in without.read_text()


def test_single_node_script_runs_torchrun_with_exact_arguments(tmp_path, plans, stubs):
    _, calls = stubs
    path, command = render_and_check(tmp_path, "single-node", plans["tp2"], [*TINY_JOB_ARGV, *NASTY])
    run_bash(path)
    (call,) = calls()
    assert call["name"] == "torchrun"
    assert call["argv"] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "2", *command]
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_multi_node_script_takes_node_rank_from_argument_or_env(tmp_path, plans, stubs, monkeypatch):
    _, calls = stubs
    path, command = render_and_check(
        tmp_path, "multi-node", plans["2x1"], [*TINY_JOB_ARGV, *NASTY], master_addr="head 1", master_port=29600
    )
    run_bash(path, "1")
    monkeypatch.setenv("NODE_RANK", "0")
    run_bash(path)
    first, second = calls()
    head = ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank"]
    tail = ["--master-addr", "head 1", "--master-port", "29600", *command]
    assert first["argv"] == [*head, "1", *tail] and second["argv"] == [*head, "0", *tail]
    monkeypatch.delenv("NODE_RANK")
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["bash", str(path), "2"], capture_output=True, text=True)  # only ranks 0 and 1
    assert r.returncode == 2


def test_slurm_per_node_script_runs_torchrun_per_node(tmp_path, plans, stubs):
    _, calls = stubs
    path, command = render_and_check(tmp_path, "slurm", plans["2x1"], [*TINY_JOB_ARGV, *NASTY], job_name="a b")
    text = path.read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --job-name='a b'",
    ):
        assert line + "\n" in text
    run_bash(path)
    (call,) = calls()
    assert call["name"] == "torchrun"
    assert call["argv"] == [
        "--node-rank",
        "0",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "node-a",
        "--master-port",
        "29500",
        *command,
    ]


def test_slurm_task_per_gpu_script_exports_ranks(tmp_path, plans, stubs):
    bin_dir, calls = stubs
    path, command = render_and_check(
        tmp_path,
        "slurm-task-per-gpu",
        plans["2x1"],
        [*TINY_JOB_ARGV, *NASTY],
        python=str(bin_dir / "fakepython"),
        master_port=29700,
    )
    text = path.read_text()
    assert "#SBATCH --ntasks-per-node=1\n" in text and "#SBATCH --nodes=2\n" in text
    run_bash(path)
    (call,) = calls()
    assert call["name"] == "fakepython" and call["argv"] == command
    assert call["env"] == {
        "CUDA_DEVICE_MAX_CONNECTIONS": None,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "node-a",
        "MASTER_PORT": "29700",
    }


def test_script_subcommand_writes_each_kind(capsys, tmp_path, plans):
    path = tmp_path / "plan.json"
    plans["2x1"].save(path)
    for kind in LAUNCH_KINDS:
        if kind == "single-node":
            continue
        out = tmp_path / f"{kind}.sh"
        rc, _, err = run_main(
            capsys,
            "script",
            str(path),
            "--kind",
            kind,
            "-o",
            str(out),
            "--master-addr",
            "h 0",
            "--",
            "pretrain_gpt.py",
            "--auto-parallel",
            *TINY_JOB_ARGV,
        )
        assert rc == 0, err
        assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
        assert "--auto-parallel" not in out.read_text()
    rc, _, err = run_main(capsys, "script", str(path), "--kind", "single-node", "--", "pretrain_gpt.py", *TINY_JOB_ARGV)
    assert_clean_error(rc, err)
    assert "single-node script runs one node" in err


# --- a real launch ---------------------------------------------------------------------------------

RECORD_SCRIPT = """import json, os, sys
out = sys.argv[sys.argv.index("--record-dir") + 1]
with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as fh:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in
               ("CUDA_DEVICE_MAX_CONNECTIONS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}}, fh)
"""


@pytest.mark.slow  # real processes
def test_run_spawns_torchrun_with_rewritten_arguments(capsys, tmp_path, monkeypatch):
    if not (VENV_BIN / "torchrun").exists():
        pytest.skip("torchrun not installed")
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = tmp_path / "record.py"
    script.write_text(RECORD_SCRIPT)
    record = tmp_path / "record dir"
    record.mkdir()
    user = [*TINY_JOB_ARGV, "--tensor-model-parallel-size", "2", "--record-dir", str(record)]
    rc, out, err = run_main(capsys, "run", "--nproc-per-node", "2", "--", str(script), "--auto-parallel", *user)
    assert rc == 0, err + out
    expected = [*user, "--pipeline-model-parallel-size", "1", "--micro-batch-size", "8", "--sequence-parallel"]
    for rank in (0, 1):
        seen = json.loads((record / f"rank{rank}.json").read_text())
        assert seen["argv"] == expected
        assert seen["env"] == {
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
