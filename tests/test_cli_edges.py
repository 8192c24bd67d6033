"""The command line's edges: Ctrl-C at any moment (real processes, a real SIGINT), output paths checked
before any work, impossible pins refused with the rule and the numbers, inputs named for what they are, and
the words of the summary (per-replica micro-batch size, data-parallel size, accumulation steps)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import child_env
from test_cli import run_main

from uniap.cluster.spec import CLUSTER_PRESETS
from uniap.cost.model import CostModel
from uniap.cost.strategy import GENERIC
from uniap.entry import run_command
from uniap.errors import EXIT_INFEASIBLE, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_OK
from uniap.model.graph import build_graph
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import TrainingSpec
from uniap.planner import configure
from uniap.report import scale_warning
from uniap.solver.uop import optimize

BIN = Path(sys.executable).parent
# A search that takes seconds: Llama-2-70B on 8 DGX A100 nodes (several hundred subproblems).
# Megatron's space (CP, interleaving) keeps the search busy for seconds after its first subproblem: the generic
# target's remaining subproblems are pruned within tens of milliseconds, which a loaded machine's SIGINT can miss.
LONG_PLAN = ["plan", "--model", "llama2-70b", "--nodes", "8", "--target", "megatron", "--json", "-v"]
SMALL = ["--model", "gpt3-1.3b", "--gpus-per-node", "8", "--global-batch-size", "16", "--seq-length", "512"]
START_TIMEOUT_S = 120
MEGATRON_JOB = (
    "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 4096 "
    "--max-position-embeddings 4096 --global-batch-size 512 --bf16"
).split()


# A shared library the commands load only once the interpreter runs their own imports (numpy, under the solver):
# a SIGINT before it would land in the interpreter's own start-up (site), which no program can answer.
IMPORTING_MARKER = "_multiarray_umath"


def _running_its_imports(pid: int) -> bool:
    try:
        return IMPORTING_MARKER in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return True  # no /proc (or the process ended): time alone decides


def interrupt(
    command: list[str],
    cwd: Path,
    *,
    after_s: float = 0.0,
    after_line: str | None = None,
    in_imports: bool = False,
):
    """Start `command`, send SIGINT `after_s` seconds after the start (`in_imports`: and not before the
    process is running its own imports) or once stderr shows `after_line`; (exit code, stdout, stderr)."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    if after_line is not None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in proc.stderr:
            seen.append(line)
            if after_line in line or time.monotonic() > deadline:
                break
    else:
        time.sleep(after_s)
        deadline = time.monotonic() + START_TIMEOUT_S
        while in_imports and not _running_its_imports(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=START_TIMEOUT_S)
    return proc.returncode, out, "".join(seen) + err


# --- Ctrl-C ------------------------------------------------------------------------------------------


@pytest.mark.slow  # real processes
@pytest.mark.parametrize(
    "prog, args",
    [
        ("uniap", ["plan"]),
        ("uniap-megatron", ["run", "--dry-run", "--nproc-per-node", "8", "--", "pretrain_gpt.py", *MEGATRON_JOB]),
        ("uniap-deepspeed", ["config", "--model", "gpt3-1.3b"]),
    ],
)
def test_ctrl_c_while_importing_is_a_message_and_exit_130(tmp_path, prog, args):
    """SIGINT 0.3 s after the start, once the command runs its own imports, lands while the solver or a
    framework is still being imported."""
    rc, out, err = interrupt([str(BIN / prog), *args], tmp_path, after_s=0.3, in_imports=True)
    if rc == EXIT_OK:
        pytest.skip("the command finished before the signal")
    assert rc == EXIT_INTERRUPTED, err
    assert err.strip().endswith(f"{prog}: interrupted") and "Traceback" not in err, err
    assert out == ""


@pytest.mark.slow  # real processes
def test_ctrl_c_during_the_solve_stops_cleanly_with_nothing_on_stdout_and_no_file(tmp_path):
    """SIGINT once the search has started solving subproblems: no plan file, nothing on stdout (which would
    corrupt --json), no SCIP chatter, exit 130."""
    output = tmp_path / "plan.json"
    started = time.monotonic()
    rc, out, err = interrupt([str(BIN / "uniap"), *LONG_PLAN, "-o", str(output)], tmp_path, after_line="deg=")
    assert "deg=" in err, "the search never started"
    assert rc == EXIT_INTERRUPTED, err
    assert out == ""
    assert not output.exists() and list(tmp_path.iterdir()) == []
    assert err.strip().endswith("uniap: interrupted") and "Traceback" not in err and "CTRL-C" not in err
    assert time.monotonic() - started < START_TIMEOUT_S


def test_ctrl_c_caught_in_a_callback_still_stops_the_command(tmp_path, monkeypatch, capsys):
    """A Ctrl-C raised inside a callback Python cannot raise from (an import lock's, a weak reference's) is only
    printed as "Exception ignored" and the work would go on (benchmarks/fuzz_cli.py found one at 1.3 s into
    `uniap plan`); the command delivers it again and stops with exit 130."""
    (tmp_path / "callback_command.py").write_text(
        "import weakref\n"
        "class Thing:\n    pass\n"
        "def interrupt(_):\n    raise KeyboardInterrupt\n"
        "def main():\n"
        "    thing = Thing()\n"
        "    ref = weakref.ref(thing, interrupt)\n"
        "    del thing  # the callback raises; Python prints it as unraisable and goes on\n"
        "    for _ in range(10_000_000):\n        pass\n"
        "    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    previous, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    try:
        assert run_command("uniap", "callback_command") == EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)  # run_command ignores a second Ctrl-C once it has said so
    assert capsys.readouterr().err.strip().endswith("uniap: interrupted")
    assert sys.unraisablehook is hook  # the command's hook does not outlive it


def test_solver_output_never_reaches_stdout(capfd):
    """Whatever SCIP's C code prints goes to stderr (file descriptor 2), not into --json's stdout."""
    from uniap.solver.miqp import _stdout_to_stderr

    with _stdout_to_stderr():
        import os

        os.write(1, b"solver chatter\n")
    out, err = capfd.readouterr()
    assert out == "" and "solver chatter" in err


# --- output paths, checked before any work ---------------------------------------------------------


def test_output_that_is_a_folder_is_refused_before_solving(capsys, tmp_path):
    started = time.perf_counter()
    rc, out, err = run_main(capsys, "plan", *SMALL, "-o", str(tmp_path))
    assert rc == EXIT_INVALID_INPUT and out == ""
    assert f"-o {tmp_path} is a folder" in err and "--force" not in err
    assert time.perf_counter() - started < 1.0  # refused before the solve


@pytest.mark.parametrize("where", ["/proc/uniap-plan.json", "/sys/uniap-plan.json"])
def test_output_where_no_file_can_be_made_is_refused(capsys, where):
    if not Path(where).parent.exists():
        pytest.skip(f"no {Path(where).parent} here")
    rc, out, err = run_main(capsys, "plan", *SMALL, "-o", where)
    assert rc == EXIT_INVALID_INPUT and out == ""
    assert f"cannot write {where}" in err and "--force" not in err and "internal error" not in err


def test_output_under_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    rc, _out, err = run_main(capsys, "evaluate", *SMALL, "-o", str(tmp_path / "a-file" / "plan.json"))
    assert rc == EXIT_INVALID_INPUT and "is not a folder" in err


def test_existing_output_suggests_force_and_force_overwrites(capsys, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("keep me")
    rc, _out, err = run_main(capsys, "plan", *SMALL, "-o", str(path))
    assert rc == EXIT_INVALID_INPUT and "exists; not overwriting it" in err and "--force" in err
    assert path.read_text() == "keep me"
    rc, _out, _err = run_main(capsys, "plan", *SMALL, "-o", str(path), "--force")
    assert rc == EXIT_OK and json.loads(path.read_text())["format"] == "uniap-plan"


@pytest.mark.slow  # real processes
@pytest.mark.parametrize(
    "argv",
    [
        ["uniap-deepspeed", "config", "--model", "gpt3-1.3b", "-o", "{tmp}"],
        ["uniap-megatron", "script", "{tmp}/plan.json", "-o", "{tmp}", "--", "pretrain_gpt.py"],
    ],
)
def test_adapters_check_their_outputs_the_same_way(tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr
    assert "is a folder" in proc.stderr and "Traceback" not in proc.stderr


# --- impossible pins: exit 2 with the rule and the numbers --------------------------------------------


@pytest.mark.parametrize("command", ["plan", "evaluate"])
@pytest.mark.parametrize(
    "pins, words",
    [
        (["--tp", "3"], "--tp 3 does not divide the 8 GPUs per node"),
        (["--tp", "16"], "--tp 16 does not divide the 8 GPUs per node"),
        (["--pp", "64"], "does not divide the 8 GPUs"),
        (["--micro-batch-size", "1000"], "--micro-batch-size 1000 does not divide the global batch size 512"),
        (["--model", "vit-huge", "--tp", "2"], "--tp 2 does not divide the sequence length 257"),
        (["--target", "megatron", "--pp", "2", "--zero", "3"], "cannot run the pinned ZeRO stage 3 with 2 pipeline"),
    ],
)
def test_impossible_pins_name_the_rule_and_exit_2(capsys, command, pins, words):
    rc, out, err = run_main(capsys, command, *pins)
    assert rc == EXIT_INVALID_INPUT, err
    assert words in err and "Traceback" not in err and out == ""


def test_pipeline_deeper_than_the_model_names_the_layers(capsys):
    rc, _out, err = run_main(capsys, "plan", "--model", "gpt3-1.3b", "--nodes", "8", "--pp", "64")
    assert rc == EXIT_INVALID_INPUT and "--pp 64 exceeds the model's 26 layers" in err


def test_no_plan_that_fits_stays_exit_3(capsys):
    rc, _out, err = run_main(capsys, "plan", "--model", "llama2-70b", "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INFEASIBLE and "no plan fits" in err


# --- inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, ref, words",
    [
        ("--model", "./nope.yaml", "model file ./nope.yaml does not exist"),
        ("--model", "specs/llama.json", "model file specs/llama.json does not exist"),
        ("--cluster", "my-cluster.yaml", "cluster file my-cluster.yaml does not exist"),
        ("--model", "lama2-7b", "unknown model preset 'lama2-7b' (did you mean llama2-7b"),
        ("--cluster", "dgx-a100", "(did you mean"),
        ("--target", "megatrom", "unknown target 'megatrom' (did you mean megatron?)"),
    ],
)
def test_missing_files_and_near_miss_names(capsys, tmp_path, monkeypatch, option, ref, words):
    monkeypatch.chdir(tmp_path)
    rc, _out, err = run_main(capsys, "plan", option, ref)
    assert rc == EXIT_INVALID_INPUT and words in err


def test_missing_spec_fields_are_named_with_the_required_ones(capsys, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("name: x\nnum_layers: 2\n")
    rc, _out, err = run_main(capsys, "plan", "--model", str(model))
    assert rc == EXIT_INVALID_INPUT
    assert "missing required field(s) architecture, hidden_size, num_attention_heads, ffn_hidden_size" in err
    assert "required fields: name, architecture, num_layers" in err and "__init__" not in err
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("num_nodes: 1\n")
    rc, _out, err = run_main(capsys, "plan", "--cluster", str(cluster))
    assert rc == EXIT_INVALID_INPUT and "missing required field(s) gpus_per_node" in err


@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_sequence_length_is_refused(capsys, value):
    rc, _out, err = run_main(capsys, "plan", "--seq-length", value)
    assert rc == EXIT_INVALID_INPUT and "seq" in err


# --- wording ------------------------------------------------------------------------------------------


def test_summary_names_the_batch_as_megatron_and_deepspeed_do(capsys):
    rc, out, _err = run_main(capsys, "evaluate", *SMALL, "--tp", "2", "--micro-batch-size", "2")
    assert rc == EXIT_OK
    assert "data-parallel size 4; micro-batch size 2 per replica x 2 micro-batches per iteration" in out
    rc, out, _err = run_main(capsys, "evaluate", *SMALL, "--micro-batch-size", "2")
    assert "x 1 micro-batch per iteration" in out and "1 micro-batches" not in out


def test_table_columns_line_up_with_long_layer_names(capsys):
    rc, out, _err = run_main(
        capsys,
        "evaluate",
        "--model",
        "t5-large",
        "--gpus-per-node",
        "8",
        "--pp",
        "2",
        "--global-batch-size",
        "16",
        "--seq-length",
        "512",
    )
    assert rc == EXIT_OK
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("stage"))
    rows = lines[header + 1 : header + 3]
    column = lines[header].index("time/micro-batch") + len("time/micro-batch")
    for row in rows:  # every row's time ends where the header's column ends
        assert row[column - 1] != " " and row[column] == " ", (lines[header], row)


def test_help_explains_the_table(capsys):
    rc, out, _err = run_main(capsys, "plan", "--help")
    assert rc == EXIT_OK
    assert "reading the table" in out and "other:" in out and "no_strategy" in out and "usable" in out


def test_a_cluster_far_larger_than_the_batch_is_warned_about(capsys):
    """The warning counts data-parallel replicas and their pipeline stages, not GPUs."""
    rc, out, err = run_main(capsys, "plan", "--nodes", "64", "--global-batch-size", "8", "--json")
    assert rc == EXIT_OK
    assert "uniap: warning: each of the" in err and "pipeline never fills" in err and "MFU" in err
    rc, _out, err = run_main(capsys, "plan", *SMALL, "--json")
    assert "warning" not in err


@pytest.mark.parametrize("batch, warned", [(2048, False), (64, True)])
def test_the_scale_warning_counts_replicas_not_gpus(batch, warned):
    """TP8 PP16 on 8,192 GPUs: 64 replicas; a batch of 2,048 gives each 32 samples for 16 stages (a normal
    job), one of 64 gives each a single sample."""
    training = TrainingSpec(global_batch_size=batch, seq_length=4096)
    cluster = CLUSTER_PRESETS["dgx-h100"].with_shape(1024)
    plan, _ = configure(MODEL_PRESETS["llama2-70b"], cluster, training, "megatron", 8, 16, 1, 1)
    assert (scale_warning(plan) is not None) is warned


# --- progress ----------------------------------------------------------------------------------------


def test_progress_covers_pricing_and_solving(capsys):
    training = TrainingSpec(global_batch_size=16, seq_length=512)
    graph = build_graph(MODEL_PRESETS["gpt3-1.3b"], training)
    cluster = CLUSTER_PRESETS["dgx-a100-80g"]
    optimize(graph, cluster, training, GENERIC, CostModel(cluster, training), progress=True)
    err = capsys.readouterr().err
    assert "pricing" in err and "solving" in err
