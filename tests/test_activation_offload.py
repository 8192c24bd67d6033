"""Activations offloaded to host memory (Megatron-LM's --cpu-offloading-num-layers): priced, planned, emitted.

Megatron-core 0.16.1 offloads the activations of N transformer layers through Transformer Engine's cpu_offload,
only with one pipeline stage, no recompute and N below the model's layers (transformer_config.py 1137-1152).
Megatron-Bridge runs Llama-3-70B this way on GB200/GB300 (40 / 20 of 80 layers), which uniap priced as not
fitting before it modelled the offload.
"""

from __future__ import annotations

import random
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from random_instances import random_graph, random_layer, small_cluster
from uniap.cluster.spec import ClusterSpec, cluster_preset
from uniap.cost.model import CostModel, offload_exposed
from uniap.cost.strategy import Pins, Strategy, capability_for, stage_strategies
from uniap.cost.tables import build_subproblem
from uniap.errors import SpecError
from uniap.model.graph import CHAIN, Edge, LayerGraph
from uniap.model.presets import model_preset
from uniap.model.spec import TrainingSpec
from uniap.planner import Job, configure, plan
from uniap.report import PIN_WORDS, render
from uniap.solver.exhaustive import exhaustive_optimum
from uniap.solver.miqp import solve_subproblem
from uniap_megatron.args import job_from_args, megatron_launch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MEGATRON = capability_for("megatron")
DIVISIBILITY = {"num_attention_heads": 8, "num_query_groups": 8, "ffn_hidden_size": 1024, "sequence_length": 512}


def _cluster(memory_gib: float) -> ClusterSpec:
    """One GPU with a fast host link (NVLink-C2C-like), which makes offloading worth it."""
    return small_cluster(memory_gib, host_memory_gib=64.0, host_link_bandwidth_gbps=400.0)


def test_the_copies_show_only_beyond_the_phase_they_run_beside():
    """Out during the forward (a third of the kernels' time), back during the backward (two thirds)."""
    assert offload_exposed(0.0, 3.0) == 0.0
    assert offload_exposed(1.0, 3.0) == 0.0
    assert offload_exposed(1.5, 3.0) == pytest.approx(0.5)
    assert offload_exposed(2.5, 3.0) == pytest.approx(1.5 + 0.5)


def test_an_offloaded_layer_keeps_its_activations_in_host_memory():
    cluster, training = _cluster(8.0), TrainingSpec(global_batch_size=8, seq_length=512)
    layer = random_graph(random.Random(3), "run").layers[1]
    model = CostModel(cluster, training)
    kept = model.layer_cost(layer, Strategy(1, 1), 1, 1, True, MEGATRON.accounting)
    sent = model.layer_cost(layer, Strategy(1, 1, offload_activations=True), 1, 1, True, MEGATRON.accounting)
    assert kept.activation_bytes > 0 and sent.activation_bytes == 0
    assert sent.host_bytes == pytest.approx(kept.activation_bytes)
    assert sent.backward_transient_bytes >= 2 * kept.activation_bytes  # this layer's and its neighbour's
    assert sent.host_copy_time > 0
    # The copies read and write HBM beside the kernels: that much slower, the link's time counted per stage.
    hbm = 2 * kept.activation_bytes / model.hbm_bytes_per_second
    assert sent.time_per_microbatch == pytest.approx(kept.time_per_microbatch + hbm)


def test_megatron_rules_decide_where_offload_is_offered():
    args = (1, 1, 8, 1, MEGATRON, "transformer", DIVISIBILITY, True)
    offered = [s for s in stage_strategies(*args, host=True, offload_activations=True) if s.offload_activations]
    assert offered and all(s.recompute == "none" for s in offered)
    pipelined = (1, 1, 8, 2, MEGATRON, "transformer", DIVISIBILITY, True)
    assert not any(s.offload_activations for s in stage_strategies(*pipelined, host=True, offload_activations=True))
    assert not any(s.offload_activations for s in stage_strategies(*args, host=False, offload_activations=True))
    head = (1, 1, 8, 1, MEGATRON, "head", DIVISIBILITY, True)
    assert not any(s.offload_activations for s in stage_strategies(*head, host=True, offload_activations=True))
    deepspeed = (1, 1, 8, 1, capability_for("deepspeed"), "transformer", DIVISIBILITY, True)
    assert not any(s.offload_activations for s in stage_strategies(*deepspeed, host=True, offload_activations=True))
    with pytest.raises(SpecError, match="offloaded or recomputed"):
        Strategy(1, 1, recompute="full", offload_activations=True)


def _six_layers() -> LayerGraph:
    """An embedding, six identical transformer layers and a head, in a chain."""
    rng = random.Random(3)
    base = random_layer(rng, "L", "transformer", "same")
    layers = [random_layer(rng, "emb", "embedding")]
    layers += [replace(base, name=f"L{i}") for i in range(6)] + [random_layer(rng, "head", "head")]
    edges = [Edge(u, u + 1, CHAIN) for u in range(len(layers) - 1)]
    return LayerGraph(layers, edges, divisibility=DIVISIBILITY)


# From too little memory for any plan, through memory that needs recompute (5.45) or offload of 5, 4, 3 layers
# (5.55-5.7), to memory that needs neither (6.0).
MEMORIES = (5.0, 5.45, 5.55, 5.6, 5.7, 6.0)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("pinned", [None, 0, 2])
def test_the_miqp_offloads_as_exhaustive_search_does(memory, pinned):
    """Six identical layers on one GPU, memory from tight to ample: the MIQP's optimum equals exhaustive
    search, offloads fewer layers than the model has, and exactly the pinned count where one is pinned."""
    graph = _six_layers()
    cluster, training = _cluster(memory), TrainingSpec(global_batch_size=8, seq_length=512)
    pins = Pins(offloaded_layers=pinned)
    sub = build_subproblem(graph, cluster, training, MEGATRON, CostModel(cluster, training), 1, 4, pins)
    expected = exhaustive_optimum(sub)
    result = solve_subproblem(sub)
    if expected is None:
        assert result.objective is None
        return
    assert result.objective == pytest.approx(expected[0], rel=2e-4)
    offloaded = sum(s.offload_activations for s in result.strategy_of)
    assert offloaded < 6
    if pinned is not None:
        assert offloaded == pinned
    elif 5.5 < memory < 5.75:
        assert offloaded > 0  # the fastest plan that fits offloads: recompute costs more
    else:
        assert offloaded == 0  # nothing to gain: the copies only take HBM time from the kernels


def test_a_tight_job_is_planned_with_offload_and_the_plan_says_why():
    """Llama-3-8B at seq 8192 on one GB200 needs recompute or offload; over NVLink-C2C offloading 13 of 32
    layers is the faster. Over a DGX H200's PCIe link nothing measured it, so the search offers it only when
    pinned; without hosts described, never."""
    model = model_preset("llama3-8b")
    cluster = cluster_preset("gb200-nvl72").with_shape(1, 1)
    training = TrainingSpec(global_batch_size=8, seq_length=8192)
    made, _ = plan(Job(model=model, cluster=cluster, training=training, target="megatron"), progress=False)
    assert 0 < made.offloaded_layers < model.num_layers
    assert any("offloaded to host memory chosen" in note and "estimated" in note for note in made.notes)
    launch = megatron_launch(made)
    assert launch.args[launch.args.index("--cpu-offloading-num-layers") + 1] == str(made.offloaded_layers)
    no_host = replace(cluster, host_memory_gib=None)
    plain, _ = plan(Job(model=model, cluster=no_host, training=training, target="megatron"), progress=False)
    assert plain.offloaded_layers == 0 and "--cpu-offloading-num-layers" not in megatron_launch(plain).args
    pcie = cluster_preset("dgx-h200").with_shape(1, 1)
    job = Job(model=model_preset("llama2-7b"), cluster=pcie, training=TrainingSpec(8, 4096), target="megatron")
    assert plan(job, progress=False)[0].offloaded_layers == 0
    pinned = replace(job, pins=Pins(offloaded_layers=16))
    assert plan(pinned, progress=False)[0].offloaded_layers == 16


def test_a_megatron_command_line_pins_the_offload():
    argv = (
        "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 4096 --global-batch-size 8 "
        "--bf16 --cpu-offloading-num-layers 8"
    ).split()
    assert job_from_args(argv).pins.offloaded_layers == 8
    model = model_preset("llama2-7b")
    cluster = cluster_preset("dgx-h200").with_shape(1, 1)
    training = TrainingSpec(global_batch_size=8, seq_length=4096)
    with pytest.raises(SpecError, match="one pipeline stage"):
        configure(model, cluster.with_shape(1, 2), training, "megatron", pp=2, offloaded_layers=8)
    with pytest.raises(SpecError, match="recompute"):
        configure(model, cluster, training, "megatron", recompute="full", offloaded_layers=8)
    made, pred = configure(model, cluster, training, "megatron", offloaded_layers=8)
    assert made.offloaded_layers == 8 and pred.stage_breakdown[0].host > 0


def test_megatron_bridge_70b_on_gb300_fits_with_its_offload():
    """Megatron-Bridge's Llama-3-70B FSDP rows on GB300 offload 20 layers: priced with it they fit, as they ran."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from published_runs import load_rows, price_row
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = [
        (source, held, row)
        for source, held, row in load_rows()
        if row["gpu"] == "GB300" and row.get("fsdp") and (row.get("flags") or {}).get("cpu_offloading")
    ]
    assert rows
    for source, held, row in rows:
        priced = price_row(source, held, row)
        assert priced.fits, row["id"]


def test_a_pinned_offload_is_kept_where_pipelined_subproblems_cannot_offload():
    """Found reading the change: with a count pinned and the pipeline degree free, a PP > 1 subproblem (where
    Megatron cannot offload) came back with no layer offloaded and the command ended on the pin's refusal."""
    model = model_preset("llama3-8b")
    cluster = cluster_preset("dgx-a100-80g").with_shape(1, 8)
    training = TrainingSpec(global_batch_size=64, seq_length=8192)
    job = Job(model=model, cluster=cluster, training=training, target="megatron", pins=Pins(offloaded_layers=4))
    made, outcome = plan(job, progress=False)
    assert made.offloaded_layers == 4 and made.pipeline_degree == 1
    assert any(r.deg > 1 and r.status == "no_strategy" for r in outcome.results)


def test_every_pin_has_words_in_the_printed_plan():
    """Found by benchmarks/fuzz_cli.py: `uniap plan --offload-activations N` printed its plan with a KeyError."""
    assert {f.name for f in fields(Pins)} <= set(PIN_WORDS)
    model = model_preset("gpt3-1.3b")
    cluster = cluster_preset("dgx-h100").with_shape(1, 8)
    training = TrainingSpec(global_batch_size=16, seq_length=512)
    job = Job(model=model, cluster=cluster, training=training, target="megatron", pins=Pins(offloaded_layers=3))
    made, _ = plan(job, progress=False)
    assert "layers with activations offloaded 3" in render(made, "t")
