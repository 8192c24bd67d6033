"""Measured profiles: JSON round trip, corrupt files, lookups, and their effect on costs and labels."""

from __future__ import annotations

import json

import pytest

from uniap.cluster.spec import cluster_preset
from uniap.cost.model import CostModel
from uniap.cost.strategy import GENERIC
from uniap.errors import ProfileError
from uniap.model import TrainingSpec, build_graph, model_preset
from uniap.plan import make_plan
from uniap.profile import CollectiveBandwidth, LayerTiming, Profile
from uniap.solver.uop import optimize


def _job():
    model = model_preset("gpt3-1.3b")
    training = TrainingSpec(global_batch_size=16, seq_length=1024)
    cluster = cluster_preset("dgx-a100-80g").with_shape(1, 4)
    return model, training, cluster, build_graph(model, training)


def _measured_profile(graph) -> Profile:
    sigs = {layer.signature for layer in graph.layers}
    layers = {
        sig: [
            LayerTiming(tp=tp, micro_batch_size=mbs, forward_ms=1.0 * mbs / tp, backward_ms=2.0 * mbs / tp)
            for tp in (1, 2, 4)
            for mbs in (1, 2)
        ]
        for sig in sigs
    }
    collectives = [
        CollectiveBandwidth(op="all_reduce", group_size=g, scope="intra_node", bus_bandwidth_gbps=100.0) for g in (2, 4)
    ] + [CollectiveBandwidth(op="p2p", group_size=2, scope="intra_node", bus_bandwidth_gbps=50.0)]
    return Profile(device="test GPU", runtime="test", layers=layers, collectives=collectives, overlap_coefficient=1.2)


def test_profile_json_round_trip(tmp_path):
    _, _, _, graph = _job()
    profile = _measured_profile(graph)
    path = tmp_path / "profile.json"
    profile.save(path)
    again = Profile.load(path)
    assert again.to_dict() == profile.to_dict()


@pytest.mark.parametrize(
    "text, words",
    [
        ("{", "not valid JSON"),
        ('{"format": "something-else"}', "not a uniap profile"),
        ('{"format": "uniap-profile", "version": 99}', "version"),
        (
            '{"format": "uniap-profile", "version": 1, "layers": {"x": [{"tp": 0, "micro_batch_size": 1, '
            '"forward_ms": 1, "backward_ms": 1}]}}',
            "tp=0",
        ),
        (
            '{"format": "uniap-profile", "version": 1, "layers": {"x": [{"tp": 1, "micro_batch_size": 1, '
            '"forward_ms": -1, "backward_ms": 1}]}}',
            "forward_ms",
        ),
        (
            '{"format": "uniap-profile", "version": 1, "collectives": [{"op": "all_reduce", "group_size": 8, '
            '"scope": "moon", "bus_bandwidth_gbps": 1}]}',
            "scope",
        ),
        ('{"format": "uniap-profile", "version": 1, "overlap_coefficient": 7}', "overlap_coefficient"),
        ('{"format": "uniap-profile", "version": 1, "layers": [1, 2]}', "corrupt profile"),
    ],
)
def test_corrupt_profiles_raise_profile_error(tmp_path, text, words):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=words):
        Profile.load(path)


def test_missing_profile_file():
    with pytest.raises(ProfileError, match="cannot read profile"):
        Profile.load("/nonexistent/profile.json")


def test_layer_time_lookup_exact_and_fitted():
    p = Profile(
        device="d",
        runtime="r",
        layers={
            "sig": [
                LayerTiming(tp=1, micro_batch_size=1, forward_ms=3.0, backward_ms=6.0),
                LayerTiming(tp=1, micro_batch_size=3, forward_ms=7.0, backward_ms=14.0),
            ]
        },
    )
    assert p.layer_times("sig", 1, 1) == (0.003, 0.006)
    fwd, bwd = p.layer_times("sig", 1, 2)  # linear fit between the two points
    assert fwd == pytest.approx(0.005) and bwd == pytest.approx(0.010)
    assert p.layer_times("sig", 2, 1) is None and p.layer_times("other", 1, 1) is None


def test_bus_bandwidth_lookup_falls_back_to_all_reduce():
    p = Profile(
        device="d",
        runtime="r",
        collectives=[CollectiveBandwidth(op="all_reduce", group_size=8, scope="inter_node", bus_bandwidth_gbps=20.0)],
    )
    assert p.bus_bandwidth("all_gather", 16, "inter_node") == 20.0
    assert p.bus_bandwidth("all_reduce", 8, "intra_node") is None
    assert p.bus_bandwidth("p2p", 2, "inter_node") is None


def test_measured_profile_drives_costs_and_labels():
    model, training, cluster, graph = _job()
    estimated = optimize(graph, cluster, training, GENERIC, CostModel(cluster, training), progress=False)
    measured_model = CostModel(cluster, training, _measured_profile(graph))
    measured = optimize(graph, cluster, training, GENERIC, measured_model, progress=False)
    plan_e = make_plan(
        estimated.sub,
        estimated.best.stage_of,
        estimated.best.strategy_of,
        estimated.prediction,
        model,
        estimated.solver_report(),
    )
    plan_m = make_plan(
        measured.sub,
        measured.best.stage_of,
        measured.best.strategy_of,
        measured.prediction,
        model,
        measured.solver_report(),
    )
    assert plan_e.basis["compute"] == "estimated" and plan_e.basis["overlap"] == "estimated"
    assert plan_m.basis["compute"] == "measured" and plan_m.basis["overlap"] == "measured"
    assert plan_m.basis["communication"] in ("measured", "mixed")
    assert plan_m.time_per_iteration != pytest.approx(plan_e.time_per_iteration, rel=1e-3)
    # The measured numbers are what the cost model uses for a layer: fwd 1 ms x mbs / tp.
    layer = graph.layers[1]
    fwd, bwd, basis = measured_model.compute_times(layer, 2, 2)
    assert (fwd, bwd, basis) == (pytest.approx(1e-3), pytest.approx(2e-3), "measured")
    assert json.loads(plan_m.to_json())["basis"]["compute"] == "measured"
