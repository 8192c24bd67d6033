"""End-to-end tests of the `uniap` command line: `uniap.cli.main(argv)` in-process (captured with
capsys) and the installed console script in a real subprocess (exit codes, no tracebacks).

Every planning job here is small (gpt3-1.3b or bert-large on one DGX A100 node, global batch 16) so
each solve takes well under a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uniap.cli import main
from uniap.cluster.spec import CLUSTER_PRESETS
from uniap.cost.model import ESTIMATED_MEMORY_MARGIN
from uniap.cost.strategy import Pins, known_targets
from uniap.errors import SpecError
from uniap.model.presets import MODEL_PRESETS
from uniap.plan import PLAN_FORMAT, PLAN_VERSION, Plan
from uniap.profile.schema import CollectiveBandwidth, LayerTiming, Profile

# A small job: 8 GPUs, 26 layers, global batch 16, seq 512.
JOB = [
    "--model",
    "gpt3-1.3b",
    "--cluster",
    "dgx-a100-80g",
    "--gpus-per-node",
    "8",
    "--global-batch-size",
    "16",
    "--seq-length",
    "512",
]
# The same on 4 GPUs (fewer subproblems).
JOB4 = [
    "--model",
    "gpt3-1.3b",
    "--cluster",
    "dgx-a100-80g",
    "--gpus-per-node",
    "4",
    "--global-batch-size",
    "16",
    "--seq-length",
    "512",
]
TRANSFORMER_KINDS = ("transformer", "cross_transformer")


# --- helpers -----------------------------------------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """Call `main(argv)`; return (exit code, stdout, stderr). argparse errors come back as their code."""
    capsys.readouterr()  # drop anything printed before
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def plan_json(capsys, *argv: str) -> tuple[Plan, dict]:
    """Run `uniap plan ... --json`, assert success and return the loaded Plan and the raw dict."""
    rc, out, err = run_main(capsys, "plan", *argv, "--json")
    assert rc == 0, err
    assert "Traceback" not in err
    data = json.loads(out)
    return Plan.from_dict(data), data


def assert_clean_error(err: str) -> None:
    """A user error: one `uniap: error:` message, no traceback, not reported as an internal error."""
    assert "Traceback" not in err
    assert "internal error" not in err
    assert "uniap: error:" in err


def uniap_command() -> list[str]:
    """The installed console script if there is one beside this interpreter, else `python -m uniap.cli`."""
    script = Path(sys.executable).parent / "uniap"
    if script.exists():
        return [str(script)]
    found = shutil.which("uniap")
    return [found] if found else [sys.executable, "-m", "uniap.cli"]


def run_subprocess(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*uniap_command(), *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def check_plan_invariants(plan: Plan) -> None:
    """What every plan the CLI prints must satisfy."""
    assert plan.time_per_iteration > 0
    assert plan.samples_per_second > 0
    assert plan.micro_batch_all_replicas * plan.micro_batches == plan.training.global_batch_size
    assert len(plan.stages) == plan.num_stages
    assert plan.devices_per_stage * plan.pipeline_degree == plan.cluster.num_nodes * plan.cluster.gpus_per_node
    for stage in plan.stages:
        assert 0 < stage.memory_bytes <= plan.memory_capacity_bytes
        assert stage.time_per_microbatch >= 0
    # every layer's strategy covers exactly one stage's devices, and dp divides the micro-batch
    for lp in plan.layers:
        assert lp.strategy.devices == plan.devices_per_stage
        assert plan.micro_batch_all_replicas % lp.strategy.dp == 0
    # stages are contiguous and in order
    stages = [lp.stage for lp in plan.layers]
    assert stages == sorted(stages)
    assert set(stages) == set(range(plan.num_stages))


# --- plan: table and JSON -----------------------------------------------------------------------------


def test_plan_defaults_prints_table(capsys):
    rc, out, err = run_main(capsys, "plan", *JOB)
    assert rc == 0, err
    assert "pipeline degree" in out
    assert "solver: optimal" in out
    assert "uniap plan: gpt3-1.3b on dgx-a100-80g (1 x 8" in out
    assert "stage" in out and "memory (GiB)" in out
    assert "Traceback" not in err
    assert "warning" not in err  # no time limit was given, so no time-limit warning


def test_plan_json_loads_and_fits(capsys):
    plan, data = plan_json(capsys, *JOB)
    assert data["format"] == PLAN_FORMAT and data["version"] == PLAN_VERSION
    check_plan_invariants(plan)
    assert plan.solver["status"] == "optimal"
    assert plan.solver["backend"] == "cvxpy+SCIP"
    assert 0 <= plan.solver["gap"] <= 1e-4
    assert plan.solver["lower_bound"] <= plan.time_per_iteration * (1 + 1e-9)
    assert plan.target == "generic"
    assert plan.model.name == "gpt3-1.3b"
    assert plan.training.global_batch_size == 16 and plan.training.seq_length == 512
    assert plan.pins == Pins()
    counts = plan.solver["subproblem_counts"]
    assert sum(counts.values()) == len(plan.solver["subproblems"]) > 0
    assert counts.get("optimal", 0) >= 1


def test_plan_json_prints_only_json(capsys):
    """--json output is exactly one JSON document (no table, no progress bar on stdout)."""
    rc, out, err = run_main(capsys, "plan", *JOB4, "--json")
    assert rc == 0, err
    json.loads(out)  # the whole stdout parses
    assert "pipeline degree" not in out


def test_plan_round_trip_through_dict_and_file(capsys, tmp_path):
    plan, data = plan_json(capsys, *JOB4)
    d = plan.to_dict()
    assert d == data
    assert Plan.from_dict(d).to_dict() == d
    assert Plan.from_dict(json.loads(plan.to_json())).to_dict() == d
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert Plan.load(path).to_dict() == d


def test_plan_output_file_refuses_overwrite_then_force(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, err = run_main(capsys, "plan", *JOB4, "-o", str(path))
    assert rc == 0, err
    assert path.exists()
    assert f"plan written to {path}" in out
    first = path.read_bytes()
    loaded = Plan.load(path)
    check_plan_invariants(loaded)

    # a second run without --force refuses and leaves the file untouched
    rc, out, err = run_main(capsys, "plan", *JOB4, "-o", str(path))
    assert rc == 2
    assert_clean_error(err)
    assert "exists" in err and "--force" in err
    assert path.read_bytes() == first

    # a different plan with --force replaces it
    rc, out, err = run_main(capsys, "plan", *JOB4, "--pp", "2", "-o", str(path), "--force")
    assert rc == 0, err
    assert path.read_bytes() != first
    replaced = Plan.load(path)
    assert replaced.pipeline_degree == 2
    assert replaced.pins == Pins(pipeline_degree=2)
    # no temporary files are left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_output_and_json_together(capsys, tmp_path):
    path = tmp_path / "p.json"
    rc, out, err = run_main(capsys, "plan", *JOB4, "--json", "-o", str(path))
    assert rc == 0, err
    assert json.loads(out) == json.loads(path.read_text())


# --- Plan JSON loading errors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_plan_dict() -> dict:
    """One valid plan dict (the megatron plan of the 4-GPU job), made once."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["plan", *JOB4, "--target", "megatron", "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


def test_plan_load_truncated_file(tmp_path, saved_plan_dict):
    path = tmp_path / "plan.json"
    text = json.dumps(saved_plan_dict, indent=2)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(SpecError, match="corrupt plan"):
        Plan.load(path)


def test_plan_load_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(SpecError, match="corrupt plan"):
        Plan.load(empty)
    with pytest.raises(SpecError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.json")


def test_plan_load_binary_garbage_is_spec_error(tmp_path):
    """A file that is not even UTF-8 is a corrupt plan too (SpecError), not a UnicodeDecodeError."""
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(SpecError):
        Plan.load(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="something-else"), "not a uniap plan"),
        (lambda d: d.pop("format"), "not a uniap plan"),
        (lambda d: d.update(version=PLAN_VERSION + 1), "plan version"),
        (lambda d: d.update(version="1"), "plan version"),
        (lambda d: d.pop("version"), "plan version"),
        (lambda d: d.pop("stages"), "corrupt plan"),
        (lambda d: d.pop("layers"), "corrupt plan"),
        (lambda d: d.update(layers=[{"name": "x"}]), "corrupt plan"),
        (lambda d: d.update(stages="nope"), "corrupt plan"),
        (lambda d: d.update(unexpected_field=1), "corrupt plan"),
        (lambda d: d.update(micro_batches=d["micro_batches"] + 1), "invalid plan"),
        (lambda d: d.update(pipeline_degree=0), "invalid plan"),
        (lambda d: d["layers"][0]["strategy"].update(tp=0), "invalid strategy"),
    ],
)
def test_plan_from_dict_rejects_bad_data(saved_plan_dict, tmp_path, mutate, message):
    data = json.loads(json.dumps(saved_plan_dict))
    mutate(data)
    with pytest.raises(SpecError, match=message):
        Plan.from_dict(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError):
        Plan.load(path)


@pytest.mark.parametrize("value", [None, [], "uniap-plan", 3])
def test_plan_from_dict_rejects_non_mapping(value):
    with pytest.raises(SpecError, match="not a uniap plan"):
        Plan.from_dict(value)


# --- targets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_sequence_length_is_refused(capsys, value):
    code, _, err = run_main(capsys, "plan", "--seq-length", value)
    assert code == 2 and "sequence length" in err and value in err
    assert_clean_error(err)


def test_target_generic(capsys):
    plan, _ = plan_json(capsys, *JOB, "--target", "generic")
    check_plan_invariants(plan)
    assert plan.target == "generic"
    assert plan.solver["status"] == "optimal"


@pytest.mark.parametrize("extra", [[], ["--pp", "2"]])
def test_target_megatron_uniform(capsys, extra):
    plan, _ = plan_json(capsys, *JOB, "--target", "megatron", *extra)
    check_plan_invariants(plan)
    assert plan.target == "megatron"
    assert len({lp.strategy.tp for lp in plan.layers}) == 1, "megatron runs one TP degree for all layers"
    assert len({lp.strategy.zero for lp in plan.layers if lp.strategy.dp > 1}) <= 1
    assert len({lp.strategy.recompute for lp in plan.layers if lp.kind in TRANSFORMER_KINDS}) == 1
    assert all(lp.strategy.zero in (0, 1, 3) for lp in plan.layers)  # no ZeRO-2 in Megatron
    if plan.pipeline_degree > 1:
        assert all(lp.strategy.zero <= 1 for lp in plan.layers)  # FSDP only at PP = 1
    assert plan.uniform_strategy is not None


@pytest.mark.parametrize("extra", [[], ["--pp", "2"]])
def test_target_deepspeed_rules(capsys, extra):
    plan, _ = plan_json(capsys, *JOB, "--target", "deepspeed", *extra)
    check_plan_invariants(plan)
    assert plan.target == "deepspeed"
    assert all(lp.strategy.tp == 1 for lp in plan.layers), "DeepSpeed has no tensor parallelism"
    if plan.pipeline_degree > 1:
        assert all(lp.strategy.zero < 2 for lp in plan.layers), "ZeRO-2/3 are incompatible with PP"
    assert len({lp.strategy.zero for lp in plan.layers if lp.strategy.dp > 1}) <= 1
    assert len({lp.strategy.recompute for lp in plan.layers if lp.kind in TRANSFORMER_KINDS}) == 1
    if extra:
        assert plan.pipeline_degree == 2


def test_restricted_targets_never_beat_generic(capsys):
    """generic's search space contains megatron's and deepspeed's: its optimum is at least as fast."""
    generic, _ = plan_json(capsys, *JOB4)
    for target in ("megatron", "deepspeed"):
        restricted, _ = plan_json(capsys, *JOB4, "--target", target)
        assert generic.time_per_iteration <= restricted.time_per_iteration * (1 + 2e-4)


def test_bert_large_megatron_plan(capsys):
    rc, out, err = run_main(
        capsys,
        "plan",
        "--model",
        "bert-large",
        "--gpus-per-node",
        "8",
        "--global-batch-size",
        "32",
        "--seq-length",
        "128",
        "--target",
        "megatron",
    )
    assert rc == 0, err
    assert "bert-large" in out and "target megatron" in out and "solver: optimal" in out


# --- pins ---------------------------------------------------------------------------------------------


def test_pin_tp(capsys):
    plan, _ = plan_json(capsys, *JOB, "--tp", "2")
    check_plan_invariants(plan)
    assert all(lp.strategy.tp == 2 for lp in plan.layers)
    assert plan.pins == Pins(tp=2)


def test_pin_pp(capsys):
    plan, _ = plan_json(capsys, *JOB, "--pp", "2")
    check_plan_invariants(plan)
    assert plan.pipeline_degree == 2
    assert plan.devices_per_stage == 4
    assert plan.pins == Pins(pipeline_degree=2)


def test_pin_zero(capsys):
    plan, _ = plan_json(capsys, *JOB, "--zero", "1")
    check_plan_invariants(plan)
    assert all(lp.strategy.zero == 1 for lp in plan.layers if lp.strategy.dp > 1)
    assert all(lp.strategy.zero == 0 for lp in plan.layers if lp.strategy.dp == 1)
    assert plan.pins == Pins(zero=1)


def test_pin_micro_batch_size(capsys):
    plan, _ = plan_json(capsys, *JOB, "--micro-batch-size", "1")
    check_plan_invariants(plan)
    # samples per replica per micro-batch = micro_batch / dp == 1 for every layer
    assert all(plan.micro_batch_all_replicas == lp.strategy.dp for lp in plan.layers)
    assert plan.pins == Pins(micro_batch_per_replica=1)


def test_pin_recompute(capsys):
    plan, _ = plan_json(capsys, *JOB4, "--recompute", "full")
    assert all(lp.strategy.recompute == "full" for lp in plan.layers if lp.kind in TRANSFORMER_KINDS)


def test_pins_combined_and_shown_in_table(capsys):
    rc, out, err = run_main(
        capsys, "plan", *JOB, "--target", "megatron", "--tp", "2", "--pp", "2", "--micro-batch-size", "1"
    )
    assert rc == 0, err
    assert "pipeline degree 2" in out
    assert "pinned: TP 2, PP 2, micro-batch size 1" in out


def test_pinned_plan_is_never_faster_than_free_plan(capsys):
    free, _ = plan_json(capsys, *JOB4)
    pinned, _ = plan_json(capsys, *JOB4, "--tp", "2", "--pp", "2")
    assert free.time_per_iteration <= pinned.time_per_iteration * (1 + 2e-4)


@pytest.mark.parametrize(
    "pins, rule",
    [
        (["--tp", "3"], "--tp 3 does not divide the 8 GPUs per node"),
        (["--tp", "16"], "--tp 16 does not divide the 8 GPUs per node"),
        (["--nodes", "8", "--pp", "64"], "--pp 64 exceeds the model's 34 layers"),
        (["--micro-batch-size", "1000"], "--micro-batch-size 1000 does not divide the global batch size 512"),
        (["--model", "vit-huge", "--tp", "2"], "--tp 2 does not divide the sequence length 257"),
        (
            ["--model", "bert-large", "--gpus-per-node", "32", "--tp", "32"],
            "--tp 32 does not split the transformer layers: attention heads 16",
        ),
        (["--tp", "2", "--pp", "2", "--micro-batch-size", "3"], "--micro-batch-size 3 does not divide"),
        (
            ["--tp", "2", "--pp", "2", "--micro-batch-size", "4", "--global-batch-size", "12"],
            "global batch size 12 is not a multiple of --micro-batch-size 4 x the data-parallel size 2",
        ),
    ],
)
def test_impossible_pins_name_the_rule_before_solving(capsys, pins, rule):
    """Exit 2 with the rule and its numbers, not exit 3's 'no plan fits'."""
    rc, out, err = run_main(capsys, "plan", *pins)
    assert rc == 2, err
    assert rule in err and out == ""
    assert_clean_error(err)


def test_impossible_pin_pp_not_dividing_gpus(capsys):
    rc, out, err = run_main(capsys, "plan", *JOB, "--pp", "3")
    assert rc == 2
    assert_clean_error(err)
    assert "--pp 3 does not divide the 8 GPUs" in err
    assert out == ""


@pytest.mark.parametrize(
    "extra",
    [
        ["--target", "deepspeed", "--tp", "2"],  # DeepSpeed has no TP
        ["--tp", "3"],  # 3 divides no stage of 8 GPUs
        ["--target", "deepspeed", "--pp", "2", "--zero", "2"],  # ZeRO-2 is incompatible with PP
        ["--micro-batch-size", "32"],  # 32 samples per replica > global batch 16
    ],
)
def test_impossible_pins_exit_cleanly(capsys, extra):
    """A pin nothing can satisfy is the user's input, not a bug: exit 2 or 3 with a message that names
    the pinned choices as the cause (never exit 1 / an internal error)."""
    rc, out, err = run_main(capsys, "plan", *JOB, *extra)
    assert rc in (2, 3), err
    assert_clean_error(err)
    assert re.search(r"pin", err, re.I), err
    assert "try:" in err


@pytest.mark.parametrize("flag", ["--tp", "--pp", "--micro-batch-size"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_pins(capsys, flag, value):
    rc, out, err = run_main(capsys, "plan", *JOB4, flag, value)
    assert rc == 2
    assert_clean_error(err)


# --- evaluate -----------------------------------------------------------------------------------------


def test_evaluate_prints_table(capsys):
    rc, out, err = run_main(capsys, "evaluate", *JOB, "--tp", "2", "--pp", "2", "--micro-batch-size", "1")
    assert rc == 0, err
    assert out.startswith("uniap evaluate: gpt3-1.3b")
    assert "pipeline degree 2" in out
    assert "TP2 DP2" in out
    assert "solver:" not in out  # nothing was solved


def test_evaluate_is_never_better_than_plan(capsys):
    """The megatron plan is optimal over everything Megatron can run, which includes TP2 PP2 mbs1."""
    ev, _ = plan_json_evaluate(
        capsys, *JOB, "--target", "megatron", "--tp", "2", "--pp", "2", "--micro-batch-size", "1"
    )
    assert ev.pipeline_degree == 2 and ev.micro_batch_all_replicas == 2 and ev.micro_batches == 8
    assert all(lp.strategy.tp == 2 and lp.strategy.dp == 2 for lp in ev.layers)
    assert all(s.memory_bytes <= ev.memory_capacity_bytes for s in ev.stages)  # it fits
    best, _ = plan_json(capsys, *JOB, "--target", "megatron")
    assert best.solver["status"] == "optimal"
    assert ev.time_per_iteration >= best.time_per_iteration * (1 - 2e-4)
    # and with the same pins the planner finds at least as good a plan as the even split
    pinned, _ = plan_json(capsys, *JOB, "--target", "megatron", "--tp", "2", "--pp", "2", "--micro-batch-size", "1")
    assert pinned.time_per_iteration <= ev.time_per_iteration * (1 + 2e-4)


def plan_json_evaluate(capsys, *argv: str) -> tuple[Plan, dict]:
    rc, out, err = run_main(capsys, "evaluate", *argv, "--json")
    assert rc == 0, err
    data = json.loads(out)
    return Plan.from_dict(data), data


def test_evaluate_split(capsys):
    ev, _ = plan_json_evaluate(capsys, *JOB4, "--pp", "2", "--tp", "2", "--split", "10,14")
    assert ev.stage_layer_counts() == [10, 14]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--tp", "3"], "--tp 3 does not divide the 8 GPUs per node"),
        (["--pp", "2", "--split", "10,10,4"], "--split"),
        (["--pp", "4", "--split", "12,0,0,12"], "empty"),
        (["--pp", "2", "--split", "5,5"], "summing to 24"),
        (["--micro-batch-size", "3"], "--micro-batch-size 3 does not divide the global batch size"),
        (["--target", "deepspeed", "--tp", "2"], "cannot run the pinned TP degree 2"),
        (["--tp", "4", "--pp", "2", "--zero", "1"], "needs data parallelism"),
        (["--tp", "0"], "positive"),
    ],
)
def test_evaluate_invalid_configurations(capsys, extra, needle):
    rc, out, err = run_main(capsys, "evaluate", *JOB, *extra)
    assert rc == 2, err
    assert_clean_error(err)
    assert needle in err


def test_evaluate_split_not_numbers(capsys):
    """`--split a,b` is invalid input (exit 2), not an internal error."""
    rc, out, err = run_main(capsys, "evaluate", *JOB4, "--pp", "2", "--split", "a,b")
    assert rc == 2, err
    assert_clean_error(err)


def test_evaluate_not_fitting_exits_3(capsys):
    rc, out, err = run_main(
        capsys,
        "evaluate",
        "--model",
        "gpt3-13b",
        "--gpus-per-node",
        "1",
        "--global-batch-size",
        "1",
        "--seq-length",
        "512",
    )
    assert rc == 3
    assert "does not fit" in err and "GiB" in err
    assert "Traceback" not in err
    assert "uniap evaluate" in out  # the table is still printed


# --- input errors -------------------------------------------------------------------------------------


def test_unknown_model_preset(capsys):
    rc, out, err = run_main(capsys, "plan", "--model", "no-such-model")
    assert rc == 2
    assert_clean_error(err)
    assert "no-such-model" in err and "llama2-7b" in err


def test_unknown_cluster(capsys):
    rc, out, err = run_main(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", "no-such-cluster")
    assert rc == 2
    assert_clean_error(err)
    assert "no-such-cluster" in err and "dgx-a100-80g" in err


def test_unknown_target(capsys):
    rc, out, err = run_main(capsys, "plan", *JOB4, "--target", "no-such-target")
    assert rc == 2
    assert_clean_error(err)
    assert "generic" in err and "megatron" in err and "deepspeed" in err


def test_invalid_model_yaml(capsys, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "architecture: decoder\nnum_layers: 2\nhidden_size: 100\nnum_attention_heads: 3\n"
        "ffn_hidden_size: 256\nvocab_size: 1000\n"
    )
    rc, out, err = run_main(
        capsys, "plan", "--model", str(spec), "--gpus-per-node", "1", "--global-batch-size", "4", "--seq-length", "64"
    )
    assert rc == 2
    assert_clean_error(err)
    assert "hidden_size" in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ("name: x\narchitecture: decoder\nnum_layers: 2\n", "missing"),
        (
            "architecture: decoder\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 2\nffn_hidden_size: 128\n"
            "vocab_size: 100\nbogus: 1\n",
            "bogus",
        ),
        (
            "architecture: decoder\nnum_layers: -1\nhidden_size: 64\nnum_attention_heads: 2\nffn_hidden_size: 128\n"
            "vocab_size: 100\n",
            "num_layers",
        ),
        ("- just\n- a list\n", "mapping"),
        ("key: [unclosed\n", "YAML"),
    ],
)
def test_invalid_model_files(capsys, tmp_path, content, needle):
    spec = tmp_path / "model.yaml"
    spec.write_text(content)
    rc, out, err = run_main(capsys, "plan", "--model", str(spec))
    assert rc == 2
    assert_clean_error(err)
    assert needle in err


def test_model_yaml_plans(capsys, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "architecture: decoder\nnum_layers: 2\nhidden_size: 256\nnum_attention_heads: 4\n"
        "ffn_hidden_size: 1024\nvocab_size: 1000\nmax_position_embeddings: 256\n"
    )
    plan, _ = plan_json(
        capsys, "--model", str(spec), "--gpus-per-node", "2", "--global-batch-size", "4", "--seq-length", "128"
    )
    assert plan.model.name == "tiny"
    check_plan_invariants(plan)


def test_seq_length_above_max_positions(capsys):
    rc, out, err = run_main(capsys, "plan", "--model", "bert-large", "--seq-length", "1024")
    assert rc == 2
    assert_clean_error(err)
    assert "seq_length" in err


@pytest.fixture()
def profile_path(tmp_path) -> Path:
    prof = Profile(
        device="NVIDIA A100",
        runtime="test",
        layers={"sig": [LayerTiming(tp=1, micro_batch_size=1, forward_ms=1.0, backward_ms=2.0)]},
        collectives=[CollectiveBandwidth("all_reduce", 8, "intra_node", 200.0)],
        overlap_coefficient=1.2,
    )
    path = tmp_path / "profile.json"
    prof.save(path)
    return path


def test_valid_profile_is_accepted(capsys, profile_path):
    plan, _ = plan_json(capsys, *JOB4, "--profile", str(profile_path))
    assert plan.basis["overlap"] == "measured"


def test_truncated_profile(capsys, profile_path):
    text = profile_path.read_text()
    profile_path.write_text(text[: len(text) // 2])
    rc, out, err = run_main(capsys, "plan", *JOB4, "--profile", str(profile_path))
    assert rc == 2
    assert_clean_error(err)
    assert "profile" in err


@pytest.mark.parametrize(
    "data",
    [
        {"format": "uniap-profile", "version": 99},
        {"format": "other", "version": 1},
        {"format": "uniap-profile", "version": 1, "layers": {"x": [{"tp": 0}]}},
        {"format": "uniap-profile", "version": 1, "layers": [1, 2]},
        {
            "format": "uniap-profile",
            "version": 1,
            "collectives": [{"op": "broadcast", "group_size": 2, "scope": "intra_node", "bus_bandwidth_gbps": 1}],
        },
        {"format": "uniap-profile", "version": 1, "overlap_coefficient": 5},
        [1, 2, 3],
    ],
)
def test_bad_profiles(capsys, tmp_path, data):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    rc, out, err = run_main(capsys, "plan", *JOB4, "--profile", str(path))
    assert rc == 2
    assert_clean_error(err)
    assert "profile" in err


def test_missing_profile(capsys, tmp_path):
    rc, out, err = run_main(capsys, "plan", *JOB4, "--profile", str(tmp_path / "nope.json"))
    assert rc == 2
    assert_clean_error(err)
    assert "profile" in err


@pytest.mark.parametrize("option", ["--profile", "--model", "--cluster"])
def test_binary_input_files_are_invalid_input(capsys, tmp_path, option):
    """A non-UTF-8 file given as profile, model or cluster is invalid input (exit 2), not a crash."""
    path = tmp_path / ("garbage.json" if option == "--profile" else "garbage.yaml")
    path.write_bytes(b"\xff\xfe\x00\x81\x92garbage")
    argv = {
        "--profile": [*JOB4, "--profile", str(path)],
        "--model": ["--model", str(path)],
        "--cluster": ["--model", "gpt3-1.3b", "--cluster", str(path)],
    }[option]
    rc, out, err = run_main(capsys, "plan", *argv)
    assert rc == 2, err
    assert_clean_error(err)


@pytest.mark.parametrize("option", ["--model", "--cluster"])
def test_overlong_names_are_invalid_input(capsys, option):
    """A preset name longer than the file system allows for a file name is still just unknown."""
    rc, out, err = run_main(capsys, "plan", option, "x" * 300)
    assert rc == 2, err
    assert_clean_error(err)


def test_cluster_file(capsys, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(
        "num_nodes: 1\ngpus_per_node: 2\ngpu_name: g\ngpu_memory_gib: 16\npeak_tflops: 100\n"
        "hbm_bandwidth_gbps: 1000\nintra_node_bandwidth_gbps: 100\ninter_node_bandwidth_gbps: 10\n"
    )
    plan, _ = plan_json(
        capsys, "--model", "bert-large", "--cluster", str(path), "--global-batch-size", "8", "--seq-length", "128"
    )
    assert plan.cluster.name == "small" and plan.cluster.gpus_per_node == 2
    assert plan.memory_capacity_bytes == pytest.approx((16 - 4) * 2**30 * (1 - ESTIMATED_MEMORY_MARGIN))


def test_invalid_cluster_file(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "num_nodes: 1\ngpus_per_node: 2\ngpu_name: g\ngpu_memory_gib: 4\nreserved_memory_gib: 8\n"
        "peak_tflops: 100\nhbm_bandwidth_gbps: 1000\nintra_node_bandwidth_gbps: 100\n"
        "inter_node_bandwidth_gbps: 10\n"
    )
    rc, out, err = run_main(capsys, "plan", "--model", "bert-large", "--cluster", str(path))
    assert rc == 2
    assert_clean_error(err)
    assert "reserved_memory_gib" in err


def test_impossible_memory_exits_3_with_hint(capsys):
    rc, out, err = run_main(
        capsys,
        "plan",
        "--model",
        "gpt3-175b",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--global-batch-size",
        "8",
        "--seq-length",
        "2048",
    )
    assert rc == 3
    assert_clean_error(err)
    assert "needs" in err and "GiB" in err
    assert "try:" in err
    assert "more GPUs" in err
    assert out == ""
    # the leanest candidate's need is above the usable memory it reports
    need = float(re.search(r"needs ([\d.]+) GiB", err).group(1))
    usable = float(re.search(r"fits in ([\d.]+) GiB usable", err).group(1))
    assert need > usable


@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_time_limit_must_be_positive(capsys, value):
    rc, out, err = run_main(capsys, "plan", *JOB4, f"--time-limit={value}")
    assert rc == 2
    assert_clean_error(err)
    assert "--time-limit" in err


@pytest.mark.parametrize("value", ["-0.1", "1", "2"])
def test_gap_must_be_in_range(capsys, value):
    rc, out, err = run_main(capsys, "plan", *JOB4, f"--gap={value}")
    assert rc == 2
    assert_clean_error(err)
    assert "--gap" in err


def test_generous_time_limit_still_optimal(capsys):
    plan, _ = plan_json(capsys, *JOB4, "--time-limit", "60")
    assert plan.solver["status"] == "optimal"


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--global-batch-size", "0"],
        ["plan", "--global-batch-size", "-16"],
        ["plan", "--nodes", "-1"],
        ["plan", "--nodes", "0"],
        ["plan", "--gpus-per-node", "-8"],
        ["plan", "--seq-length", "-5"],
        ["evaluate", "--global-batch-size", "-1"],
    ],
)
def test_non_positive_job_numbers(capsys, argv):
    rc, out, err = run_main(capsys, *argv[:1], "--model", "gpt3-1.3b", *argv[1:])
    assert rc == 2
    assert_clean_error(err)


def test_argparse_errors_exit_2(capsys):
    for argv in (["plan", "--global-batch-size", "abc"], ["plan", "--precision", "fp8"], ["nope"], []):
        rc, out, err = run_main(capsys, *argv)
        assert rc == 2, argv
        assert "usage:" in err


# --- presets and version ------------------------------------------------------------------------------


def test_presets_lists_models_clusters_targets(capsys):
    rc, out, err = run_main(capsys, "presets")
    assert rc == 0
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert {k.strip() for k in lines} == {"models", "clusters", "targets"}
    assert [m.strip() for m in lines["models"].split(",")] == list(MODEL_PRESETS)
    assert [c.strip() for c in lines["clusters"].split(",")] == list(CLUSTER_PRESETS)
    targets = [t.strip() for t in lines["targets"].split(",")]
    assert targets == known_targets()
    assert {"generic", "megatron", "deepspeed"} <= set(targets)
    assert "llama2-7b" in lines["models"] and "dgx-a100-80g" in lines["clusters"]


def test_version(capsys):
    from uniap import __version__

    rc, out, err = run_main(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"uniap {__version__}"


# --- the real console script --------------------------------------------------------------------------


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_plan_succeeds(tmp_path):
    proc = run_subprocess("plan", *JOB4, "-o", "plan.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline degree" in proc.stdout and "solver: optimal" in proc.stdout
    assert "Traceback" not in proc.stderr
    check_plan_invariants(Plan.load(tmp_path / "plan.json"))


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_refuses_overwrite(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("keep me")
    proc = run_subprocess("plan", *JOB4, "-o", str(target))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--force" in proc.stderr
    assert target.read_text() == "keep me"


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_unknown_model():
    proc = run_subprocess("plan", "--model", "no-such-model")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "llama2-7b" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_infeasible_memory():
    proc = run_subprocess(
        "plan", "--model", "gpt3-175b", "--gpus-per-node", "8", "--global-batch-size", "8", "--seq-length", "2048"
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert "needs" in proc.stderr and "GiB" in proc.stderr and "try:" in proc.stderr


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_impossible_pin():
    proc = run_subprocess("plan", *JOB, "--target", "deepspeed", "--tp", "2")
    assert proc.returncode in (2, 3), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.slow  # a real process: its start and imports take about 1.5 s
def test_subprocess_module_presets():
    proc = subprocess.run([sys.executable, "-m", "uniap.cli", "presets"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "models:" in proc.stdout and "clusters:" in proc.stdout and "targets:" in proc.stdout
    assert proc.stderr == ""


def test_time_limit_returns_best_plan_with_gap(capsys):
    """A time limit too short to solve every subproblem still returns the best plan found, says so,
    and reports the gap; nothing hangs."""
    code = main(
        [
            "plan",
            "--model",
            "llama2-70b",
            "--nodes",
            "8",
            "--global-batch-size",
            "1024",
            "--time-limit",
            "0.001",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    plan = Plan.from_dict(json.loads(out))
    assert plan.solver["status"] == "time_limit"
    assert 0 < plan.solver["gap"] < 1
    assert plan.solver["subproblem_counts"].get("not_solved", 0) > 0
    assert "time limit" in err and "%" in err
    assert all(s.memory_bytes <= plan.memory_capacity_bytes for s in plan.stages)
