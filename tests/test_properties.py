"""Property-based tests (hypothesis) of the planner over random small models, clusters and jobs.

The central property: `optimize` either returns a plan that fits in memory, that `evaluate` prices
exactly as the outcome says, and that survives a JSON round trip as a `Plan`; or it raises a
`UniapError` with a message. Nothing else may escape. Further properties compare the optimum with
hand-made configurations and with exhaustive enumeration, and feed the CLI random bad input.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from sweep import SWEEP
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from uniap.cli import main
from uniap.cluster.spec import CLUSTER_PRESETS, ClusterSpec
from uniap.cost.evaluate import check_assignment, evaluate, even_split
from uniap.cost.model import ESTIMATED_MEMORY_MARGIN, CostModel
from uniap.cost.strategy import NO_PINS, Strategy, capability_for, known_targets
from uniap.cost.tables import build_subproblem
from uniap.errors import InfeasibleError, SpecError, UniapError
from uniap.model.graph import build_graph
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan, make_plan
from uniap.solver.exhaustive import exhaustive_optimum
from uniap.solver.miqp import DEFAULT_GAP
from uniap.solver.uop import candidate_pairs, optimize

GiB = 2**30
TARGETS = ("generic", "megatron", "deepspeed")
TRANSFORMER_KINDS = ("transformer", "cross_transformer")

# derandomize: the same examples every run (a CI failure reproduces locally). No shrinking for solver
# properties: each example solves MIQPs, and shrinking one failure would take about a minute; the
# failing example is printed as found.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
SOLVER_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# --- strategies ---------------------------------------------------------------------------------------


@st.composite
def model_specs(draw, max_layers: int = 6) -> ModelSpec:
    return ModelSpec(
        name="prop-model",
        architecture=draw(st.sampled_from(["decoder", "encoder"])),
        num_layers=draw(st.integers(1, max_layers)),
        hidden_size=draw(st.sampled_from([64, 128, 256])),
        num_attention_heads=draw(st.sampled_from([2, 4, 8])),
        ffn_hidden_size=draw(st.sampled_from([128, 256, 512])),
        vocab_size=draw(st.integers(100, 5000)),
    )


@st.composite
def cluster_specs(draw, gpus=(1, 2, 4)) -> ClusterSpec:
    # from 1 MiB usable (nothing fits) through 0.05 GiB (little fits) to 79.5 GiB (everything fits)
    memory = draw(
        st.one_of(
            st.sampled_from([0.501, 0.52, 0.55, 0.6, 0.75, 1.0, 2.0, 80.0]), st.floats(0.505, 4.0, allow_nan=False)
        )
    )
    return ClusterSpec(
        name="prop-cluster",
        num_nodes=draw(st.integers(1, 2)),
        gpus_per_node=draw(st.sampled_from(list(gpus))),
        gpu_name="test-gpu",
        gpu_memory_gib=memory,
        reserved_memory_gib=0.5,
        peak_tflops=100.0,
        hbm_bandwidth_gbps=1000.0,
        intra_node_bandwidth_gbps=100.0,
        inter_node_bandwidth_gbps=10.0,
    )


@st.composite
def training_specs(draw) -> TrainingSpec:
    return TrainingSpec(
        global_batch_size=draw(st.integers(1, 16)),
        seq_length=draw(st.integers(16, 128)),
        flash_attention=draw(st.booleans()),
    )


def _tiny(arch="decoder", layers=4, hidden=128, heads=4, ffn=256, vocab=1000) -> ModelSpec:
    return ModelSpec(
        name="prop-model",
        architecture=arch,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
    )


def _cluster(nodes=1, gpn=4, mem=2.0) -> ClusterSpec:
    return ClusterSpec(
        name="prop-cluster",
        num_nodes=nodes,
        gpus_per_node=gpn,
        gpu_name="test-gpu",
        gpu_memory_gib=mem,
        reserved_memory_gib=0.5,
        peak_tflops=100.0,
        hbm_bandwidth_gbps=1000.0,
        intra_node_bandwidth_gbps=100.0,
        inter_node_bandwidth_gbps=10.0,
    )


def _solve(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, target: str, **kw):
    graph = build_graph(model, training)
    capability = capability_for(target)
    cost_model = CostModel(cluster, training, None)
    return (
        graph,
        capability,
        cost_model,
        optimize(graph, cluster, training, capability, cost_model, progress=False, **kw),
    )


# --- the central property -----------------------------------------------------------------------------


@SOLVER_SETTINGS
@given(model=model_specs(), cluster=cluster_specs(), training=training_specs(), target=st.sampled_from(TARGETS))
def test_optimize_returns_valid_plan_or_uniap_error(model, cluster, training, target):
    try:
        graph, capability, cost_model, out = _solve(model, cluster, training, target)
    except UniapError as exc:
        event(f"raised {type(exc).__name__}")
        assert str(exc).strip(), "a UniapError must carry a message"
        assert exc.exit_code in (2, 3, 4)
        if isinstance(exc, InfeasibleError):
            assert exc.exit_code == 3
            match = re.search(r"needs ([\d.]+) GiB", str(exc))
            if match:  # the leanest candidate indeed does not fit
                usable = cluster.usable_memory_bytes * (1 - ESTIMATED_MEMORY_MARGIN) / GiB
                assert float(match.group(1)) >= round(usable, 1)
        return
    # any other exception propagates and fails the test
    event(f"plan: pp{out.sub.deg} status {out.status}")

    pred = out.prediction
    sub, best = out.sub, out.best
    # it fits
    assert pred.fits
    # reserved bytes against the usable memory; allocated (reserved / ratio) against the MIQP's budget
    assert all(m <= pred.memory_capacity * (1 + 1e-9) for m in pred.stage_memory)
    assert all(m / pred.reserved_per_allocated <= sub.memory_capacity * (1 + 1e-9) for m in pred.stage_memory)
    assert pred.memory_capacity == cluster.usable_memory_bytes * (1 - ESTIMATED_MEMORY_MARGIN)
    # the evaluator prices the returned assignment exactly as the outcome says
    again = evaluate(sub, best.stage_of, best.strategy_of)
    assert again.time_per_iteration == pred.time_per_iteration
    assert again == pred
    assert pred.time_per_iteration > 0
    # the assignment is in the search space and respects the target's rules
    check_assignment(sub, best.stage_of, best.strategy_of)
    assert all(capability.allows(s, sub.deg) for s in best.strategy_of)
    assert all(s.devices == sub.stage_devices and sub.micro_batch_all_replicas % s.dp == 0 for s in best.strategy_of)
    assert len({s.cp for s in best.strategy_of}) == 1  # one context-parallel degree for the model
    if capability.uniform_tp:
        assert len({s.tp for s in best.strategy_of}) == 1
    assert sub.deg * sub.c >= 1 and cluster.num_gpus % sub.deg == 0
    assert training.global_batch_size % sub.c == 0
    # solver bookkeeping
    assert out.status in ("optimal", "time_limit")
    assert 0 <= out.gap <= 1
    assert out.lower_bound <= pred.time_per_iteration * (1 + 1e-9)
    assert best.objective is not None
    assert any(r.status == "optimal" for r in out.results) or out.status == "time_limit"

    # a Plan that round-trips through JSON
    plan = make_plan(sub, best.stage_of, best.strategy_of, pred, model, out.solver_report())
    data = json.loads(plan.to_json())
    again_plan = Plan.from_dict(data)
    assert again_plan.to_dict() == plan.to_dict()
    assert again_plan == plan
    assert plan.target == target
    assert plan.time_per_iteration == pred.time_per_iteration
    assert len(plan.layers) == len(graph.layers)
    assert [lp.stage for lp in plan.layers] == best.stage_of
    assert sum(s.num_layers for s in plan.stages) == len(graph.layers)
    assert all(s.memory_bytes <= plan.memory_capacity_bytes * (1 + 1e-9) for s in plan.stages)
    assert plan.micro_batch_all_replicas * plan.micro_batches == training.global_batch_size
    assert plan.mfu > 0


# --- optimality --------------------------------------------------------------------------------------


@SWEEP  # random instances of the same check; the fast command keeps the central property
@SOLVER_SETTINGS
@given(model=model_specs(), cluster=cluster_specs(), training=training_specs(), target=st.sampled_from(TARGETS))
def test_without_time_limit_status_is_optimal_and_miqp_matches_evaluate(model, cluster, training, target):
    """With no time limit every subproblem is solved to the gap, so the outcome must say 'optimal', and
    the MIQP's objective of the chosen plan must equal its `evaluate` price (they are one cost model)."""
    try:
        _, _, _, out = _solve(model, cluster, training, target)
    except UniapError:
        return
    tpi = out.prediction.time_per_iteration
    assert out.best.objective == pytest.approx(tpi, rel=DEFAULT_GAP)
    assert out.status == "optimal", f"status {out.status} (gap {out.gap:.4%}) without any time limit"


@SWEEP  # random instances of the same check; the fast command keeps the central property
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    model=model_specs(max_layers=2),
    cluster=cluster_specs(gpus=(1, 2)),
    training=training_specs(),
    target=st.sampled_from(TARGETS),
)
def test_optimum_matches_exhaustive_search(model, cluster, training, target):
    """On tiny instances, enumerate every plan of every subproblem: the planner's answer is the best one
    (within the optimality gap), and it raises InfeasibleError exactly when nothing fits."""
    graph = build_graph(model, training)
    capability = capability_for(target)
    cost_model = CostModel(cluster, training, None)
    best = None
    for deg, c, v in candidate_pairs(graph, cluster, training, capability, NO_PINS):
        sub = build_subproblem(graph, cluster, training, capability, cost_model, deg, c, v=v)
        if not sub.feasible_strategies:
            continue
        found = exhaustive_optimum(sub)
        if found and (best is None or found[0] < best[0]):
            best = found
    try:
        out = optimize(graph, cluster, training, capability, cost_model, progress=False)
    except InfeasibleError:
        assert best is None, f"planner found no plan, exhaustive search found one of {best[0]:.6g} s"
        return
    assert best is not None
    assert out.prediction.time_per_iteration <= best[0] * (1 + DEFAULT_GAP) + 1e-12
    assert out.prediction.time_per_iteration >= best[0] * (1 - 1e-9)


@SWEEP  # random instances of the same check; the fast command keeps the central property
@SOLVER_SETTINGS
@given(
    model=model_specs(),
    cluster=cluster_specs(),
    training=training_specs(),
    target=st.sampled_from(TARGETS),
    data=st.data(),
)
def test_no_hand_made_configuration_beats_the_plan(model, cluster, training, target, data):
    """What `uniap evaluate` prices (uniform TP x DP, even split, one ZeRO stage and recompute mode) is
    in the planner's search space: if it is valid and fits, the plan is at least as fast."""
    n = cluster.num_gpus
    deg = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]), label="pp")
    per_stage = n // deg
    tp = data.draw(st.sampled_from([t for t in range(1, per_stage + 1) if per_stage % t == 0]), label="tp")
    dp = per_stage // tp
    assume(training.global_batch_size % dp == 0)
    per_replica = training.global_batch_size // dp
    mbs = data.draw(
        st.sampled_from([m for m in range(1, per_replica + 1) if per_replica % m == 0]), label="micro_batch_size"
    )
    zero = data.draw(st.sampled_from([0, 1, 2, 3] if dp > 1 else [0]), label="zero")
    recompute = data.draw(st.sampled_from(["none", "full"]), label="recompute")
    c = training.global_batch_size // (mbs * dp)
    graph = build_graph(model, training)
    assume(deg <= len(graph.layers))
    capability = capability_for(target)
    cost_model = CostModel(cluster, training, None)
    sub = build_subproblem(graph, cluster, training, capability, cost_model, deg, c)
    stage_of = even_split(graph, deg)
    strategy_of = [
        Strategy(tp, dp, zero, recompute if layer.kind in TRANSFORMER_KINDS else "none") for layer in graph.layers
    ]
    try:
        hand = evaluate(sub, stage_of, strategy_of)
    except SpecError:
        assume(False)  # not runnable on this target / shape (e.g. an empty stage)
    assume(hand.fits)
    out = optimize(graph, cluster, training, capability, cost_model, progress=False)  # must not raise
    assert out.prediction.time_per_iteration <= hand.time_per_iteration * (1 + DEFAULT_GAP) + 1e-12


# --- regressions found by the properties above (fixed inputs) -----------------------------------------


def test_regression_tiny_megatron_is_optimal_without_time_limit():
    """4-layer decoder (hidden 128) on 1 x 4 GPUs, batch 14, seq 78, megatron: the MIQP's objective of
    the chosen plan undershot its `evaluate` price by 0.41% and the outcome said 'time_limit' although
    no time limit was given (the CLI then warns "stopped at the time limit")."""
    _, _, _, out = _solve(
        _tiny(layers=4, heads=4, ffn=256, vocab=1000),
        _cluster(1, 4, 2.0),
        TrainingSpec(global_batch_size=14, seq_length=78),
        "megatron",
    )
    assert out.best.objective == pytest.approx(out.prediction.time_per_iteration, rel=DEFAULT_GAP)
    assert out.status == "optimal", f"status {out.status} (gap {out.gap:.4%}) without any time limit"


def test_regression_tiny_megatron_pp4_plan_is_the_best():
    """4-layer decoder (hidden 128, 2 heads, ffn 512, vocab 2440) on 2 x 2 GPUs, batch 4, seq 18,
    megatron: the planner returned a plan 0.39% slower than the best plan of the same subproblem
    (pipeline degree 4, one micro-batch), which exhaustive enumeration finds."""
    model, cluster = _tiny(layers=4, hidden=128, heads=2, ffn=512, vocab=2440), _cluster(2, 2, 80.0)
    training = TrainingSpec(global_batch_size=4, seq_length=18)
    graph, capability, cost_model, out = _solve(model, cluster, training, "megatron")
    sub = build_subproblem(graph, cluster, training, capability, cost_model, 4, 1)
    best = exhaustive_optimum(sub)
    assert out.prediction.time_per_iteration <= best[0] * (1 + DEFAULT_GAP)


# --- the CLI with random bad input --------------------------------------------------------------------

_argv_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40)


def _not_a_known_name(text: str, known) -> bool:
    return text not in known and not os.path.exists(text) and text.strip() == text and text != ""


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)  # must return, never raise
    _, err = capsys.readouterr()
    return rc, err


CLI_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
SMALL_JOB = ["--model=bert-large", "--gpus-per-node=1", "--global-batch-size=2", "--seq-length=32"]


@CLI_SETTINGS
@given(
    command=st.sampled_from(["plan", "evaluate"]), name=_argv_text.filter(lambda t: _not_a_known_name(t, MODEL_PRESETS))
)
def test_cli_random_model_names(capsys, command, name):
    rc, err = _run([command, f"--model={name}", "--gpus-per-node=1", "--global-batch-size=2"], capsys)
    assert rc == 2, err
    assert "uniap: error:" in err and "internal error" not in err
    assert "llama2-7b" in err  # the list of known presets


@CLI_SETTINGS
@given(
    command=st.sampled_from(["plan", "evaluate"]),
    name=_argv_text.filter(lambda t: _not_a_known_name(t, CLUSTER_PRESETS)),
)
def test_cli_random_cluster_names(capsys, command, name):
    rc, err = _run([command, "--model=bert-large", f"--cluster={name}"], capsys)
    assert rc == 2, err
    assert "uniap: error:" in err and "internal error" not in err
    assert "dgx-a100-80g" in err


@CLI_SETTINGS
@given(command=st.sampled_from(["plan", "evaluate"]), name=_argv_text.filter(lambda t: t not in known_targets()))
def test_cli_random_target_names(capsys, command, name):
    rc, err = _run([command, *SMALL_JOB, f"--target={name}"], capsys)
    assert rc == 2, err
    assert "uniap: error:" in err and "internal error" not in err
    assert "generic" in err


@CLI_SETTINGS
@given(
    command=st.sampled_from(["plan", "evaluate"]),
    option=st.sampled_from(["--global-batch-size", "--nodes", "--gpus-per-node", "--seq-length"]),
    value=st.integers(-(10**6), 0),
)
def test_cli_non_positive_numbers(capsys, command, option, value):
    argv = [command, *[a for a in SMALL_JOB if not a.startswith(option + "=")], f"{option}={value}"]
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    assert "uniap: error:" in err and "internal error" not in err
    assert "positive" in err


@CLI_SETTINGS
@given(option=st.sampled_from(["--tp", "--pp", "--micro-batch-size"]), value=st.integers(-(10**6), 0))
def test_cli_non_positive_pins(capsys, option, value):
    rc, err = _run(["plan", *SMALL_JOB, f"{option}={value}"], capsys)
    assert rc == 2, err
    assert "uniap: error:" in err and "internal error" not in err


@CLI_SETTINGS
@given(value=st.floats(max_value=0, allow_nan=False))
def test_cli_non_positive_time_limit(capsys, value):
    rc, err = _run(["plan", *SMALL_JOB, f"--time-limit={value!r}"], capsys)
    assert rc == 2, err
    assert "--time-limit" in err
