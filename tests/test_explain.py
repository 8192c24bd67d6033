"""`uniap explain` (issue 13 item 3): why a plan, in numbers that add up, and a picture that draws the schedule
the cost model assumes."""

from __future__ import annotations

import importlib.util

import pytest
from test_cli import run_main

from uniap.cluster.spec import cluster_preset
from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK, SpecError
from uniap.explain import explain, plot, render_explanation, schedule
from uniap.model import TrainingSpec, model_preset
from uniap.planner import Job
from uniap.planner import plan as solve
from uniap.cost.strategy import Pins


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """GPT-3 13B on one 8-GPU node with 4 pipeline stages, saved as `uniap plan -o` saves it."""
    job = Job(
        model=model_preset("gpt3-13b"),
        cluster=cluster_preset("dgx-a100-80g").with_shape(1, 8),
        training=TrainingSpec(global_batch_size=32, seq_length=2048),
        target="megatron",
        pins=Pins(pipeline_degree=4, virtual_stages=1),
    )
    path = tmp_path_factory.mktemp("explain") / "plan.json"
    solve(job, progress=False)[0].save(path)
    return path


def test_the_numbers_add_up(pipelined):
    from uniap.plan import Plan

    plan = Plan.load(pipelined)
    e = explain(plan)
    assert len(e.ranks) == 4 and e.bottleneck == max(range(4), key=lambda r: e.ranks[r].time_per_microbatch)
    for r in e.ranks:
        assert 0 < r.compute <= r.time_per_microbatch
        assert (
            r.reserved_gib
            == pytest.approx(
                (r.states_gib + r.activations_gib + r.transients_gib) * plan.reserved_per_allocated, rel=1e-6
            )
            or r.reserved_gib >= r.step_gib
        )
        assert r.reserved_gib <= r.usable_gib
    # the iteration: the bottleneck busy c times, the bubble, the once-per-iteration part
    busy = plan.micro_batches * e.ranks[e.bottleneck].time_per_microbatch / plan.time_per_iteration
    assert busy + e.bubble_share + e.once_share == pytest.approx(1.0, abs=1e-9)
    assert 0 < e.bubble_share < 0.5 and 0 <= e.communication_share < 1
    text = render_explanation(e)
    for words in ("bottleneck: rank", "pipeline bubble", "memory headroom", "the search's next best", "MFU"):
        assert words in text
    assert len(e.runner_ups) == 3


def test_the_timeline_is_a_1f1b_schedule(pipelined):
    from uniap.plan import Plan

    plan = Plan.load(pipelined)
    e = explain(plan)
    runs = schedule(e)
    c, deg = plan.micro_batches, plan.pipeline_degree
    end = {}
    for r, ops in enumerate(runs):
        assert sorted((k, m) for k, m, _, _ in ops) == sorted(
            [("F", m) for m in range(c)] + [("B", m) for m in range(c)]
        )
        for (_, _, s1, d1), (_, _, s2, _) in zip(ops, ops[1:]):
            assert s2 >= s1 + d1 - 1e-12  # one thing at a time on a rank
        warm = [k for k, _, _, _ in ops[: deg - r - 1]]
        assert warm == ["F"] * min(deg - r - 1, c)  # the warm-up: deg - r - 1 forwards
        for k, m, s, d in ops:
            end[(k, m, r)] = (s, s + d)
    for m in range(c):
        for r in range(1, deg):
            assert end[("F", m, r)][0] >= end[("F", m, r - 1)][1]
            assert end[("B", m, r - 1)][0] >= end[("B", m, r)][1]
    makespan = max(s + d for ops in runs for _, _, s, d in ops)
    assert plan.micro_batches * e.ranks[e.bottleneck].time_per_microbatch <= makespan <= plan.time_per_iteration


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (uniap[plot])")
def test_plot_writes_png_and_svg(pipelined, tmp_path):
    from uniap.plan import Plan

    e = explain(Plan.load(pipelined))
    png, svg = tmp_path / "p.png", tmp_path / "p.svg"
    plot(e, png)
    plot(e, svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:1000]
    with pytest.raises(SpecError, match=r"\.png, \.svg or \.pdf"):
        plot(e, tmp_path / "p.jpg")


def test_cli_explain(capsys, pipelined, tmp_path):
    rc, out, err = run_main(capsys, "explain", str(pipelined))
    assert rc == EXIT_OK, err
    assert "bottleneck: rank" in out
    picture = tmp_path / "plan.png"
    picture.write_text("mine")
    rc, out, err = run_main(capsys, "explain", str(pipelined), "--plot", str(picture))
    assert rc == EXIT_INVALID_INPUT and "exists" in err and picture.read_text() == "mine"
    rc, _, err = run_main(capsys, "explain", str(tmp_path / "missing.json"))
    assert rc == EXIT_INVALID_INPUT and "missing.json" in err


def test_compare_lists_plans_side_by_side(capsys, pipelined, tmp_path):
    hand = tmp_path / "hand.json"
    rc, _, err = run_main(
        capsys, "evaluate", "--model", "gpt3-13b", "--cluster", "dgx-a100-80g", "--nodes", "1", "--gpus-per-node",
        "8", "--global-batch-size", "32", "--seq-length", "2048", "--target", "megatron", "--tp", "8", "--pp", "1",
        "--micro-batch-size", "1", "-o", str(hand),
    )  # fmt: skip
    assert rc == EXIT_OK, err
    picture = tmp_path / "compare.svg"
    rc, out, err = run_main(capsys, "compare", str(pipelined), str(hand), "--plot", str(picture))
    assert rc == EXIT_OK, err
    lines = out.splitlines()
    assert lines[1].split()[0] == "plan" and lines[2].split()[0] == "hand"
    assert "TP8 CP1 PP1 DP1" in lines[2] and ("best" in lines[1]) != ("best" in lines[2])
    assert "x slower" in out and picture.exists()
    rc, _, err = run_main(capsys, "compare", str(tmp_path / "nope.json"))
    assert rc == EXIT_INVALID_INPUT and "nope.json" in err


@pytest.mark.parametrize("command", [("explain",), ("evaluate", "--plan")])
def test_a_saved_plan_is_priced_once(capsys, pipelined, monkeypatch, command):
    """`explain` and `evaluate --plan` check the saved plan by pricing it, and report that same pricing."""
    import uniap.explain
    import uniap.planner

    calls = []
    real = uniap.planner.price
    for module in (uniap.planner, uniap.explain):
        monkeypatch.setattr(module, "price", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, _, err = run_main(capsys, *command, str(pipelined))
    assert rc == EXIT_OK, err
    assert len(calls) == 1
