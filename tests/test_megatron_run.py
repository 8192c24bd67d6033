"""Real megatron-core runs of the arguments uniap emits for a plan: CPU processes joined by gloo.

For a plan with TP = 2 (from `uniap plan --target megatron --tp 2`) and a plan with PP = 2 and the
uneven split 3+1 (from `uniap evaluate --target megatron --pp 2 --split 3,1`), and a plan with PP = 4 and
the split 2,1,2,1 (which only `--pipeline-model-parallel-layout` can express), this launches
`python -m torch.distributed.run --nproc-per-node N tests/megatron_train.py --args-json ...` with
`megatron_launch(plan).args + model_args(model, training)`. The per-rank program builds megatron-core's
GPTModel for its stage from those arguments and runs one training iteration through megatron-core's
own pipeline schedule (tests/megatron_cpu_shim.py redirects megatron-core's few CUDA-only spots; test
code only, never imported by the product).

Checked: the loss is finite and bit-identical when the same run is repeated (TP and PP plans); each
stage built the
number of transformer layers the plan gives it, with the right global layer numbers; Megatron's
micro-batch count equals the plan's; and the distributed run computes the same loss as a one-process run
of the same model (TP: megatron-core's CPU initialization draws the same master weights on every TP
rank; PP: the weights are redrawn by global parameter name), so the emitted arguments realize the
model and not just some model.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from uniap.profile.runner import free_port
from uniap.cli import main
from uniap.plan import Plan

from uniap_megatron.args import megatron_launch, model_args

TESTS = Path(__file__).parent
TRAIN = TESTS / "megatron_train.py"
RUN_TIMEOUT = 300  # seconds per launch; a launch takes ~15-20 s (1-2 ranks) to ~25 s (4 ranks) on 2 CPU cores

# megatron-core warns about Apex/TE being absent; not our concern.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.slow,
]  # every test runs megatron-core in subprocesses

# A tiny Llama-style decoder: GQA (4 heads, 2 query groups), SwiGLU, RMSNorm, RoPE, untied, no bias.
TINY = """\
name: tiny-llama
architecture: decoder
num_layers: {layers}
hidden_size: 64
num_attention_heads: 4
num_query_groups: 2
ffn_hidden_size: 128
vocab_size: 256
gated_mlp: true
normalization: rmsnorm
tied_embeddings: false
position_embedding: rope
max_position_embeddings: 64
add_bias: false
dropout: 0.0
"""


def _uniap(*argv: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    assert rc == 0, f"uniap {' '.join(argv)} -> {rc}\n{out.getvalue()}\n{err.getvalue()}"


def _job(model: Path, gpus: int, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--cluster",
        "dgx-a100-80g",
        "--nodes",
        "1",
        "--gpus-per-node",
        str(gpus),
        "--global-batch-size",
        "4",
        "--seq-length",
        "32",
        "--precision",
        "fp32",
        "--target",
        "megatron",
        *extra,
    ]


def _argv(plan: Plan) -> list[str]:
    return megatron_launch(plan).args + model_args(plan.model, plan.training)


def launch(plan: Plan, out_dir: Path, *, reinit_by_name: bool = False) -> dict:
    """Run megatron_train.py on as many processes as the plan has GPUs; return the rank and loss files."""
    nproc = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    out_dir.mkdir(parents=True)
    args_json = out_dir / "args.json"
    args_json.write_text(json.dumps({"argv": _argv(plan), "reinit_by_name": reinit_by_name}))
    env = {**os.environ, **megatron_launch(plan).env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(TRAIN),
        "--args-json",
        str(args_json),
        "--out-dir",
        str(out_dir),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"megatron run timed out after {RUN_TIMEOUT} s: {' '.join(cmd)}\n"
            f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}"
        )
    if proc.returncode != 0 or not (out_dir / "loss.json").exists():
        pytest.fail(
            f"megatron run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}"
        )
    ranks = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])
    assert len(ranks) == nproc
    return {"ranks": ranks, "loss": json.loads((out_dir / "loss.json").read_text())}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("megatron_run")
    (d / "tiny4.yaml").write_text(TINY.format(layers=4))
    (d / "tiny6.yaml").write_text(TINY.format(layers=6))
    return d


def _plan(work: Path, name: str, *argv: str) -> Plan:
    path = work / f"{name}.json"
    _uniap(*argv, "-o", str(path))
    return Plan.load(path)


# --- plans -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2_plan(work) -> Plan:
    plan = _plan(work, "tp2", "plan", *_job(work / "tiny4.yaml", 2, "--tp", "2", "--micro-batch-size", "2"))
    s = plan.uniform_strategy
    assert (s.tp, s.dp, plan.pipeline_degree, plan.micro_batches) == (2, 1, 1, 2)
    return plan


@pytest.fixture(scope="module")
def pp2_plan(work) -> Plan:
    plan = _plan(work, "pp2", "evaluate", *_job(work / "tiny4.yaml", 2, "--pp", "2", "--split", "3,1"))
    assert plan.pipeline_degree == 2 and plan.stage_layer_counts() == [3, 1] and plan.micro_batches == 4
    return plan


@pytest.fixture(scope="module")
def layout_plan(work) -> Plan:
    plan = _plan(work, "pp4", "evaluate", *_job(work / "tiny6.yaml", 4, "--pp", "4", "--split", "2,1,2,1"))
    assert plan.stage_layer_counts() == [2, 1, 2, 1]
    return plan


# --- runs (each launched once per module and shared by the tests below) -----------------------------


@pytest.fixture(scope="module")
def tp2_runs(work, tp2_plan):
    return [launch(tp2_plan, work / f"tp2_run{i}") for i in range(2)]


@pytest.fixture(scope="module")
def pp2_runs(work, pp2_plan):
    return [launch(pp2_plan, work / f"pp2_run{i}", reinit_by_name=True) for i in range(2)]


@pytest.fixture(scope="module")
def layout_run(work, layout_plan):
    return launch(layout_plan, work / "pp4_run", reinit_by_name=True)


def _check_repeatable(runs: list[dict], plan: Plan) -> None:
    a, b = runs
    assert a["loss"]["finite"] and math.isfinite(a["loss"]["loss"])
    assert 0.5 * math.log(256) < a["loss"]["loss"] < 2 * math.log(256)  # ~ln(vocab) for a fresh model
    assert a["loss"]["num_microbatches"] == plan.micro_batches == len(a["loss"]["per_microbatch"])
    assert a["loss"] == b["loss"], "the same run twice must give bit-identical losses"
    assert [r["grad_sq"] for r in a["ranks"]] == [r["grad_sq"] for r in b["ranks"]]
    assert all(math.isfinite(r["grad_sq"]) and r["grad_sq"] > 0 for r in a["ranks"])


def _check_stage_layers(run: dict, plan: Plan) -> None:
    counts = plan.stage_layer_counts()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    seen = set()
    for r in run["ranks"]:
        i = r["pp_rank"]
        assert r["num_layers_built"] == counts[i], (r, counts)
        assert r["layer_numbers"] == list(range(starts[i] + 1, starts[i] + counts[i] + 1))
        assert r["pre_process"] == (i == 0) and r["post_process"] == (i == plan.pipeline_degree - 1)
        assert r["num_microbatches"] == plan.micro_batches
        seen.add((i, r["tp_rank"], r["dp_rank"]))
    s = plan.uniform_strategy
    assert len(seen) == plan.pipeline_degree * s.devices == len(run["ranks"])


# --- TP = 2 ------------------------------------------------------------------------------------------


def test_tp2_plan_emits_tensor_and_sequence_parallelism(tp2_plan):
    launch_ = megatron_launch(tp2_plan)
    args = launch_.args
    assert args[args.index("--tensor-model-parallel-size") + 1] == "2"
    assert args[args.index("--pipeline-model-parallel-size") + 1] == "1"
    assert "--sequence-parallel" in args
    assert launch_.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def test_tp2_run_is_finite_and_repeatable(tp2_runs, tp2_plan):
    _check_repeatable(tp2_runs, tp2_plan)
    assert all(r["sequence_parallel"] for r in tp2_runs[0]["ranks"])


def test_tp2_run_builds_all_layers_on_both_tp_ranks(tp2_runs, tp2_plan):
    _check_stage_layers(tp2_runs[0], tp2_plan)
    assert sorted(r["tp_rank"] for r in tp2_runs[0]["ranks"]) == [0, 1]


def test_tp2_run_matches_one_process(work, tp2_runs, tp2_plan):
    """The same job on one GPU (TP = 1, same micro-batch) computes the same loss: TP and sequence
    parallelism as emitted split the same model, they do not change it."""
    one = _plan(work, "tp1", "evaluate", *_job(work / "tiny4.yaml", 1, "--micro-batch-size", "2"))
    assert "--sequence-parallel" not in megatron_launch(one).args
    ref = launch(one, work / "tp1_run")
    assert ref["loss"]["num_microbatches"] == tp2_runs[0]["loss"]["num_microbatches"]
    assert ref["loss"]["loss"] == pytest.approx(tp2_runs[0]["loss"]["loss"], abs=1e-5)


# --- PP = 2, uneven 3 + 1 ----------------------------------------------------------------------------


def test_pp2_uneven_plan_emits_first_last_flags(pp2_plan):
    args = megatron_launch(pp2_plan).args
    assert args[args.index("--decoder-first-pipeline-num-layers") + 1] == "3"
    assert args[args.index("--decoder-last-pipeline-num-layers") + 1] == "1"
    assert "--pipeline-model-parallel-layout" not in args


def test_pp2_run_is_finite_and_repeatable(pp2_runs, pp2_plan):
    _check_repeatable(pp2_runs, pp2_plan)


def test_pp2_run_builds_3_then_1_layers(pp2_runs, pp2_plan):
    _check_stage_layers(pp2_runs[0], pp2_plan)
    assert [r["num_layers_built"] for r in pp2_runs[0]["ranks"]] == [3, 1]


def test_pp2_run_matches_one_process(work, pp2_runs, pp2_plan):
    """One process, no pipeline, the same weights (redrawn by global name): the same loss, so the 3 + 1
    stages hold layers 1-3 and 4 in order and the schedule ran all 4 micro-batches through both."""
    one = _plan(work, "pp1", "evaluate", *_job(work / "tiny4.yaml", 1))
    assert one.micro_batches == pp2_plan.micro_batches
    ref = launch(one, work / "pp1_run", reinit_by_name=True)
    assert ref["loss"]["per_microbatch"] == pytest.approx(pp2_runs[0]["loss"]["per_microbatch"], abs=1e-5)


# --- PP = 4, split 2,1,2,1 (layout) ------------------------------------------------------------------


def test_layout_plan_emits_a_layout(layout_plan):
    args = megatron_launch(layout_plan).args
    layout = args[args.index("--pipeline-model-parallel-layout") + 1]
    assert layout.replace(",", "") == "Et*2|t*1|t*2|t*1L"
    assert not any(a.startswith("--decoder-") for a in args)


def test_layout_run_is_finite_and_split_as_planned(layout_run, layout_plan):
    assert layout_run["loss"]["finite"] and layout_run["loss"]["num_microbatches"] == layout_plan.micro_batches
    _check_stage_layers(layout_run, layout_plan)
    assert [r["num_layers_built"] for r in layout_run["ranks"]] == [2, 1, 2, 1]


def test_layout_run_matches_one_process(work, layout_run, layout_plan):
    one = _plan(work, "pp1-6", "evaluate", *_job(work / "tiny6.yaml", 1))
    assert one.micro_batches == layout_plan.micro_batches
    ref = launch(one, work / "pp1-6_run", reinit_by_name=True)
    assert ref["loss"]["per_microbatch"] == pytest.approx(layout_run["loss"]["per_microbatch"], abs=1e-5)


# --- TP = 2 x PP = 2, uneven 3 + 1, on 4 processes ---------------------------------------------------


@pytest.fixture(scope="module")
def tp2pp2_plan(work) -> Plan:
    plan = _plan(work, "tp2pp2", "evaluate", *_job(work / "tiny4.yaml", 4, "--tp", "2", "--pp", "2", "--split", "3,1"))
    s = plan.uniform_strategy
    assert (s.tp, s.dp, plan.pipeline_degree, plan.stage_layer_counts()) == (2, 1, 2, [3, 1])
    return plan


def test_tp2pp2_run_sends_sequence_parallel_activations_between_stages(work, tp2pp2_plan):
    """Sequence parallelism and an uneven pipeline together: the stages exchange sequence shards
    (seq / TP per rank) through megatron-core's p2p code, and every rank builds its stage's layers."""
    args = megatron_launch(tp2pp2_plan).args
    assert "--sequence-parallel" in args and "--decoder-first-pipeline-num-layers" in args
    run = launch(tp2pp2_plan, work / "tp2pp2_run")
    assert run["loss"]["finite"] and run["loss"]["num_microbatches"] == tp2pp2_plan.micro_batches
    _check_stage_layers(run, tp2pp2_plan)
    assert all(r["sequence_parallel"] for r in run["ranks"])
    assert sorted((r["pp_rank"], r["tp_rank"], r["num_layers_built"]) for r in run["ranks"]) == [
        (0, 0, 3),
        (0, 1, 3),
        (1, 0, 1),
        (1, 1, 1),
    ]
