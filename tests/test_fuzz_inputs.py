"""Fuzzing the inputs every command reads (issue 22): model, training and cluster specs, Hugging Face configs and
saved plans with any JSON value in any field. Each is either read or refused with a UniapError (exit 2 and the
field named at the command line); nothing else may escape (a TypeError, a ZeroDivisionError, a hang)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_inputs import LLAMA

from uniap.cluster.spec import ClusterSpec, cluster_preset
from uniap.errors import UniapError
from uniap.model.loaders import from_hf_config
from uniap.model.presets import model_preset
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan
from uniap.planner import configure, price

# Any JSON value, hostile ones first in line: wrong types, huge and tiny numbers, non-finite floats, nesting.
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**62, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["", "abc", "false", "true", "nan", "1e9", "llama"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODEL = model_preset("gpt3-1.3b").to_dict()
TRAINING = TrainingSpec(global_batch_size=16, seq_length=512).to_dict()
CLUSTER = cluster_preset("dgx-h100").to_dict()


def read_or_refused(read, data) -> None:
    """`read(data)` returns, or raises a UniapError; anything else is a bug the fuzzer found."""
    try:
        read(data)
    except UniapError:
        pass


@EXAMPLES
@given(field=st.sampled_from(sorted(MODEL)), value=JSON_VALUES)
def test_a_model_spec_with_any_value_in_any_field(field, value):
    read_or_refused(ModelSpec.from_dict, {**MODEL, field: value})


@EXAMPLES
@given(field=st.sampled_from(sorted(TRAINING)), value=JSON_VALUES)
def test_a_training_spec_with_any_value_in_any_field(field, value):
    read_or_refused(TrainingSpec.from_dict, {**TRAINING, field: value})


@EXAMPLES
@given(field=st.sampled_from(sorted(CLUSTER)), value=JSON_VALUES)
def test_a_cluster_spec_with_any_value_in_any_field(field, value):
    read_or_refused(ClusterSpec.from_dict, {**CLUSTER, field: value})


@EXAMPLES
@given(
    field=st.sampled_from(
        sorted(LLAMA)
        + ["num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "attention_dropout"]
    ),
    value=JSON_VALUES,
    kind=st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "bert", "t5", "vit", "mixtral", ""]),
)
def test_a_hugging_face_config_with_any_value_in_any_field(field, value, kind):
    read_or_refused(lambda cfg: from_hf_config(cfg), {**LLAMA, "model_type": kind, field: value})


@pytest.fixture(scope="module")
def saved_plan() -> dict:
    plan, _ = configure(
        model_preset("gpt3-1.3b"),
        cluster_preset("dgx-h100").with_shape(1, 8),
        TrainingSpec(global_batch_size=16, seq_length=512),
        "megatron",
        tp=2,
        pp=2,
    )
    return json.loads(json.dumps(plan.to_dict()))


def _paths(data, prefix=()):
    """Every (path, value) in a JSON document, to mutate one."""
    yield prefix, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data[:3]):
            yield from _paths(value, (*prefix, i))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.integers(min_value=0), value=JSON_VALUES)
def test_a_saved_plan_with_any_value_anywhere_is_read_and_priced_or_refused(saved_plan, choice, value):
    paths = [path for path, _ in _paths(saved_plan) if path]
    path = paths[choice % len(paths)]
    data = copy.deepcopy(saved_plan)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value

    def read_and_price(d):
        plan = Plan.from_dict(d)
        priced = price(plan)
        assert math.isfinite(priced.prediction.time_per_iteration)

    read_or_refused(read_and_price, data)


HOSTILE = [None, {}, [], "x", -1, 0, 2**62, float("nan"), float("inf"), True, 1.5, 10**9, 3]


def test_every_field_of_a_saved_plan_with_each_hostile_value(saved_plan):
    """All 150-odd places of a saved plan times 13 hostile values (about 2,000 plans): each is read and priced
    or refused; none escapes as another exception (a 10^9-stage pipeline was a MemoryError)."""
    places = [path for path, _ in _paths(saved_plan) if path]
    cases = refused = 0
    for value in HOSTILE:
        for path in places:
            data = copy.deepcopy(saved_plan)
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            cases += 1
            try:
                price(Plan.from_dict(data))
            except UniapError:
                refused += 1
    assert cases >= 1_500 and refused > cases // 2
