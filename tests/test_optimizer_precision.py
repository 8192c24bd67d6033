"""The precision-aware optimizer (Megatron-LM's --use-precision-aware-optimizer): lower-precision gradients,
master parameters and Adam moments in the memory model, its rules, and reading it from a command line."""

from __future__ import annotations

import pytest
from megatron_argv import SMALLEST_ARGV

from uniap.cluster.spec import load_cluster
from uniap.cost.accounting import PerParam, precision_aware_saving
from uniap.errors import SpecError
from uniap.model.presets import MODEL_PRESETS
from uniap.planner import configure
from uniap.model.spec import training_spec
from uniap_megatron.args import job_from_args, model_args

LLAMA2_7B = MODEL_PRESETS["llama2-7b"]
AWARE = ["--use-distributed-optimizer", "--use-precision-aware-optimizer"]


@pytest.mark.parametrize(
    "precision, zero, dtypes, saving",
    [
        # bf16 parameters, fp32 master: only the 16-bit remainders are kept (2 of its 4 bytes, sharded)
        ("bf16", 1, ("fp32", "fp32", "fp32", "fp32"), PerParam(0, 2)),
        ("bf16", 1, ("bf16", "fp32", "bf16", "bf16"), PerParam(2, 6)),
        ("bf16", 1, ("bf16", "fp32", "fp8", "fp8"), PerParam(2, 8)),
        ("fp16", 1, ("fp32", "fp16", "fp32", "fp32"), PerParam(0, 2)),
        ("fp16", 1, ("fp32", "fp32", "fp32", "fp32"), PerParam(0, 0)),  # remainders need bf16 parameters
        ("fp32", 1, ("fp32", "fp32", "bf16", "fp32"), PerParam(0, 2)),
        ("bf16", 0, ("bf16", "fp32", "bf16", "bf16"), PerParam(8, 0)),
        ("bf16", 3, ("bf16", "fp32", "bf16", "bf16"), PerParam(0, 8)),
    ],
)
def test_saving_per_parameter(precision, zero, dtypes, saving):
    assert precision_aware_saving(precision, zero, *dtypes) == saving


def test_plans_hold_less_memory_with_it():
    """Megatron's bf16 states with the distributed optimizer over d ranks: 6 + 12/d bytes per parameter; with bf16
    gradients and moments and the master's remainders 4 + 6/d."""
    cluster = load_cluster("dgx-a100-80g", 1)
    plain = training_spec(LLAMA2_7B, 64, seq_length=4096)
    aware = training_spec(
        LLAMA2_7B,
        64,
        seq_length=4096,
        precision_aware_optimizer=True,
        main_grads_dtype="bf16",
        exp_avg_dtype="bf16",
        exp_avg_sq_dtype="bf16",
    )
    states = [
        configure(LLAMA2_7B, cluster, t, "megatron", tp=2, zero=1)[0].stages[0].states_bytes for t in (plain, aware)
    ]
    assert states[1] / states[0] == pytest.approx((4 + 6 / 4) / (6 + 12 / 4), rel=0.02)


def test_targets_without_it_refuse_it():
    cluster = load_cluster("dgx-a100-80g", 1)
    aware = training_spec(LLAMA2_7B, 64, seq_length=4096, precision_aware_optimizer=True)
    with pytest.raises(SpecError, match="target 'deepspeed' has no precision-aware optimizer"):
        configure(LLAMA2_7B, cluster, aware, "deepspeed")


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"exp_avg_dtype": "bf16"}, "exp_avg_dtype.*can only be fp32 without the precision-aware optimizer"),
        ({"precision_aware_optimizer": True, "optimizer": "sgd"}, "only supported with the adam optimizer"),
        ({"precision_aware_optimizer": True, "main_grads_dtype": "fp16"}, "main_grads_dtype.*fp32, bf16"),
    ],
)
def test_its_rules_are_checked_when_the_spec_is_built(fields, needle):
    with pytest.raises(SpecError, match=needle):
        training_spec(LLAMA2_7B, 64, **fields)


def test_a_megatron_command_line_sets_it_and_gets_it_back():
    argv = [*SMALLEST_ARGV, *AWARE, "--main-grads-dtype", "bf16", "--exp-avg-sq-dtype", "fp8"]
    training = job_from_args(argv).training
    assert training.precision_aware_optimizer
    assert (training.main_grads_dtype, training.exp_avg_dtype, training.exp_avg_sq_dtype) == ("bf16", "fp32", "fp8")
    emitted = model_args(job_from_args(argv).model, training)
    assert "--use-precision-aware-optimizer" in emitted and emitted[emitted.index("--exp-avg-sq-dtype") + 1] == "fp8"
    assert "--exp-avg-dtype" not in emitted  # Megatron's default needs no flag


def test_without_the_distributed_optimizer_it_is_refused_by_name():
    with pytest.raises(SpecError, match="--use-precision-aware-optimizer needs --use-distributed-optimizer"):
        job_from_args([*SMALLEST_ARGV, "--use-precision-aware-optimizer"])
