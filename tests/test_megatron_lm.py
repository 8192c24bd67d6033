"""uniap's Megatron-LM flags and emitted arguments against Megatron-LM core_v0.16.1's own argument code.

Run for real (tests/megatron_lm.py; skipped with the reason where Megatron-LM's training package is not
found): its parser defines every flag of uniap's table the way the table says, and its `parse_args` +
`validate_args` accept the arguments of every plan of the grid (tests/megatron_plans.py) and of a plan merged
into a user's command line, deriving the data-parallel size and micro-batch count the plan was priced with.
"""

from __future__ import annotations

import megatron_lm
import pytest
from megatron_plans import ALL_JOBS, emitted, get_plan

from uniap_megatron import flags as F
from uniap_megatron.capability import CONNECTIONS_ENV
from uniap_megatron.merge import merged_argv
from uniap_megatron.planning import plan_megatron

pytestmark = pytest.mark.slow  # Megatron-LM's argument code in a subprocess

ACTION_OF_KIND = {
    F.Kind.VALUE: "_StoreAction",
    F.Kind.SWITCH: "_StoreTrueAction",
    F.Kind.NEGATION: "_StoreFalseAction",
    F.Kind.IMPLIES: "_StoreTrueAction",
}
# What validate_args reports back about a plan (the attributes Megatron derives or reads).
REPORTED = (
    "cpu_offloading",
    "cpu_offloading_num_layers",
    "data_parallel_size",
    "tensor_model_parallel_size",
    "context_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "micro_batch_size",
    "global_batch_size",
    "sequence_parallel",
    "recompute_granularity",
)


def test_flag_table_matches_megatron_lm_parser():
    """Each flag of uniap's table exists in Megatron-LM's parser with the same attribute, action, type and
    default; an alias that implies a value (--recompute-activations) is Megatron's own switch, and
    validate_args turns it into the value the table says."""
    megatron_lm.require()
    actions = megatron_lm.parser_actions([f.spelling for f in F.ALL_FLAGS])
    problems = []
    for flag in F.ALL_FLAGS:
        got = actions[flag.spelling]
        if got is None:
            problems.append(f"{flag.spelling}: not a Megatron-LM flag")
            continue
        if got["action"] != ACTION_OF_KIND[flag.kind]:
            problems.append(f"{flag.spelling}: Megatron's action is {got['action']}, the table says {flag.kind}")
        if flag.kind is F.Kind.IMPLIES:
            continue  # its own dest in Megatron; the implication is checked below
        if got["dest"] != flag.dest:
            problems.append(f"{flag.spelling}: Megatron sets args.{got['dest']}, the table says {flag.dest}")
        if flag.kind is F.Kind.VALUE and (got["type"] or "str") != flag.type.__name__:
            problems.append(f"{flag.spelling}: Megatron's type is {got['type']}, the table says {flag.type.__name__}")
        if got["default"] != flag.default:
            problems.append(
                f"{flag.spelling}: Megatron's default is {got['default']!r}, the table says {flag.default!r}"
            )
    assert problems == []
    base = [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--max-position-embeddings",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
    ]
    implied = [f for f in F.ALL_FLAGS if f.kind is F.Kind.IMPLIES]
    results = megatron_lm.validate([(base + f.tokens(), {}, 1) for f in implied], report=tuple(f.dest for f in implied))
    for flag, result in zip(implied, results):
        assert result.get("args", {}).get(flag.dest) == flag.const, (flag.spelling, result)


def test_megatron_lm_validates_every_plan_of_the_grid():
    """parse_args + validate_args accept each plan's arguments in the plan's environment, and derive the
    parallel sizes and batch the plan was priced with."""
    megatron_lm.require()
    plans = [get_plan(name, argv) for name, argv in ALL_JOBS]
    cases = []
    for plan in plans:
        words, env, _model, _training = emitted(plan)
        cases.append((words, env, plan.cluster.num_gpus))
    results = megatron_lm.validate(cases, report=REPORTED)
    failures = []
    for (name, _argv), plan, result in zip(ALL_JOBS, plans, results):
        wrong = differences(result, plan)
        if wrong:
            failures.append(f"{name}: {wrong}")
    assert failures == [], f"{len(failures)} of {len(plans)} plans:\n" + "\n".join(failures)


def planned_arguments(plan) -> dict:
    """What Megatron-LM's final arguments must say for `plan` (validate_args' names; LAYERS_PER_STAGE: the decoder
    layers megatron-core builds per model chunk)."""
    s = plan.uniform_strategy
    return {
        "tensor_model_parallel_size": s.tp,
        "context_parallel_size": s.cp,
        "pipeline_model_parallel_size": plan.pipeline_degree,
        "virtual_pipeline_model_parallel_size": plan.virtual_stages if plan.virtual_stages > 1 else None,
        "data_parallel_size": plan.data_parallel_size,
        "micro_batch_size": plan.micro_batch_per_replica,
        "global_batch_size": plan.training.global_batch_size,
        "sequence_parallel": s.tp > 1,
        "use_distributed_optimizer": s.zero in (1, 3) and s.shards > 1,
        "use_megatron_fsdp": s.zero == 3 and s.shards > 1,
        "recompute_granularity": None if s.recompute == "none" else s.recompute,
        # validate_args sets it only where a layer is offloaded; Megatron-LM's parser has no such flag.
        "cpu_offloading": True if plan.offloaded_layers else None,
        "cpu_offloading_num_layers": plan.offloaded_layers,
        megatron_lm.LAYERS_PER_STAGE: plan.stage_layer_counts(),
    }


def differences(result: dict, plan) -> dict | str:
    """Megatron's error, or {argument: (Megatron's value, the plan's)} for each reported argument that differs,
    and the number of micro-batches Megatron derives (empty: Megatron runs the plan)."""
    if "error" in result:
        return result["error"]
    got = result["args"]
    wrong = {k: (got[k], v) for k, v in planned_arguments(plan).items() if k in got and got[k] != v}
    micro_batches = got["global_batch_size"] // (got["micro_batch_size"] * got["data_parallel_size"])
    if micro_batches != plan.micro_batches:
        wrong["micro-batches"] = (micro_batches, plan.micro_batches)
    return wrong


LLAMA2_7B = """
--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --seq-length 4096
--max-position-embeddings 4096 --swiglu --normalization RMSNorm --position-embedding-type rope
--untie-embeddings-and-output-weights --disable-bias-linear --vocab-size 32000 --global-batch-size 128 --bf16
""".split()
LLAMA2_70B = """
--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64 --group-query-attention
--num-query-groups 8 --seq-length 4096 --max-position-embeddings 4096 --swiglu --normalization RMSNorm
--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear --vocab-size 32000
--global-batch-size 512 --bf16
""".split()


# A user's command line in the style of Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh, cut to a
# small GPT: model and training flags, logging, data; no parallel flags (the plan chooses them) except a
# pinned pipeline size.
USER_ARGV = """
--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048
--micro-batch-size 2 --global-batch-size 256 --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9
--adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --bf16 --lr 6.0e-5 --lr-decay-style cosine
--min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000 --pipeline-model-parallel-size 2
--data-path /data/gpt/text_document --vocab-file /data/gpt2-vocab.json --merge-file /data/gpt2-merges.txt
--split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10
""".split()


def test_megatron_lm_validates_a_plan_merged_into_a_user_command_line():
    """The user's flags kept, the plan's added: Megatron-LM accepts the whole command line and runs the
    plan's configuration (the user's pinned pipeline and micro-batch size among it)."""
    megatron_lm.require()
    plan = plan_megatron(USER_ARGV, nodes=2, gpus_per_node=8)
    argv, merge = merged_argv(plan, USER_ARGV)
    (result,) = megatron_lm.validate([(argv, merge.env, 16)], report=REPORTED)
    assert "error" not in result, result
    got = result["args"]
    assert got["pipeline_model_parallel_size"] == plan.pipeline_degree == 2
    assert got["micro_batch_size"] == plan.micro_batch_per_replica == 2
    assert got["data_parallel_size"] == plan.data_parallel_size


@pytest.mark.parametrize("connections", ["1", None, "8"])
def test_megatron_lm_accepts_plans_made_for_the_launch_environment(connections):
    """Under the plugin the ranks run with the CUDA_DEVICE_MAX_CONNECTIONS they were launched with: plans made
    for each value (Llama-2-70B on 64 GPUs with full recompute pinned, where Megatron-FSDP is attractive, and a
    7B job) pass validate_args in exactly that environment on a Hopper GPU."""
    megatron_lm.require()
    jobs = [
        (
            LLAMA2_70B
            + ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
            8,
        ),
        (LLAMA2_7B, 1),
    ]
    env = {} if connections is None else {CONNECTIONS_ENV: connections}
    cases, plans = [], []
    for argv, nodes in jobs:
        plan = plan_megatron(argv, nodes=nodes, gpus_per_node=8, connections=connections)
        plans.append(plan)
        cases.append((merged_argv(plan, argv)[0], env, nodes * 8))
    results = megatron_lm.validate(cases, report=("tensor_model_parallel_size", "use_megatron_fsdp"))
    for plan, result in zip(plans, results):
        assert "error" not in result, (connections, plan.uniform_strategy, result)
        if connections == "1":
            assert not result["args"]["use_megatron_fsdp"]
        else:
            assert result["args"]["tensor_model_parallel_size"] == 1 or result["args"]["use_megatron_fsdp"]


@pytest.mark.parametrize("optimizer", ["muon", "dist_muon", "sgd"])
def test_megatron_lm_accepts_plans_for_the_users_optimizer(optimizer):
    """Muon runs without the distributed optimizer, FSDP and overlapped reduction; the plan emits none of
    them and Megatron-LM's validate_args accepts the merged command line (issue: it refused the overlap flags)."""
    megatron_lm.require()
    argv = LLAMA2_7B + ["--optimizer", optimizer]
    plan = plan_megatron(argv, nodes=1, gpus_per_node=8)
    merged, merge = merged_argv(plan, argv)
    (result,) = megatron_lm.validate([(merged, merge.env, 8)], report=("optimizer", "use_distributed_optimizer"))
    assert "error" not in result, (plan.uniform_strategy, result)
    assert plan.training.optimizer == ("sgd" if optimizer == "sgd" else "muon")
    if "muon" in optimizer:
        assert plan.uniform_strategy.zero == 0 and not result["args"]["use_distributed_optimizer"]


def llama3(layers: int, hidden: int, ffn: int, heads: int, seq: int, batch: int) -> list[str]:
    """A Llama-3-shaped command line (grouped-query attention with 8 groups, 128k vocabulary)."""
    return f"""
--num-layers {layers} --hidden-size {hidden} --ffn-hidden-size {ffn} --num-attention-heads {heads}
--group-query-attention --num-query-groups 8 --seq-length {seq} --max-position-embeddings {seq} --swiglu
--normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights
--disable-bias-linear --vocab-size 128256 --global-batch-size {batch} --bf16
""".split()


LLAMA3_8B_8K = llama3(32, 4096, 14336, 32, 8192, 512)
LLAMA3_8B_128K = llama3(32, 4096, 14336, 32, 131072, 64)
LLAMA3_70B_32K = llama3(80, 8192, 28672, 64, 32768, 128)
GPT3_175B = """
--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048
--vocab-size 50257 --global-batch-size 1536 --bf16
""".split()
NO_ROPE_FUSION = "--no-rope-fusion"
PRECISION_AWARE = """
--use-distributed-optimizer --use-precision-aware-optimizer --main-grads-dtype bf16 --exp-avg-dtype bf16
--exp-avg-sq-dtype bf16
""".split()
# The user's parallel flags and the attribute validate_args leaves each in (the pin must hold).
PINNED_DESTS = {
    "--tensor-model-parallel-size": "tensor_model_parallel_size",
    "--context-parallel-size": "context_parallel_size",
    "--pipeline-model-parallel-size": "pipeline_model_parallel_size",
    "--num-virtual-stages-per-pipeline-rank": "virtual_pipeline_model_parallel_size",
}
FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
# Realistic jobs (name, Megatron arguments, nodes of 8 GPUs, CUDA_DEVICE_MAX_CONNECTIONS at launch): the
# models people pretrain, 8 to 1024 GPUs, long sequences where context parallelism pays, and the user's pins.
REAL_JOBS = [
    ("llama2-7b", LLAMA2_7B, 1, "1"),
    ("llama2-70b", LLAMA2_70B, 8, "1"),
    ("llama2-70b-unset", LLAMA2_70B + FULL_RECOMPUTE, 8, None),
    ("llama3-8b-8k", LLAMA3_8B_8K, 1, None),
    ("llama3-8b-8k-pp4", LLAMA3_8B_8K + ["--pipeline-model-parallel-size", "4"], 1, "1"),
    ("llama3-8b-128k", LLAMA3_8B_128K, 4, "1"),
    ("llama3-70b-32k", LLAMA3_70B_32K, 8, "1"),
    (
        "llama3-70b-32k-tp8-cp4",
        LLAMA3_70B_32K + ["--tensor-model-parallel-size", "8", "--context-parallel-size", "4"],
        8,
        "1",
    ),
    ("llama2-70b-cp2", LLAMA2_70B + ["--context-parallel-size", "2"], 8, "1"),
    ("llama2-7b-tp2-sp", LLAMA2_7B + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], 1, "1"),
    ("llama3-8b-8k-dist-opt", LLAMA3_8B_8K + ["--use-distributed-optimizer"], 1, "1"),
    ("llama2-7b-muon", LLAMA2_7B + ["--optimizer", "muon"], 1, "1"),
    ("gpt3-175b-1024", GPT3_175B, 128, None),
    # interleaved 1F1B pinned: an even split over PP x 2 chunks, no layout beside the flag
    ("llama2-70b-vpp2", LLAMA2_70B + ["--num-virtual-stages-per-pipeline-rank", "2"], 8, "1"),
    (
        "llama2-7b-pp4-vpp4",
        LLAMA2_7B + ["--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank", "4"],
        1,
        "1",
    ),
]


def test_megatron_lm_runs_realistic_jobs_as_planned():
    """Each realistic job's merged command line passes Megatron-LM's parse_args, validate_args and
    core_transformer_config_from_args in the launch's environment (Hopper), and Megatron's final arguments are
    the plan: TP, CP, PP, DP, micro and global batch, number of micro-batches, the decoder layers each pipeline
    rank builds (per model chunk when interleaved), sequence parallelism, distributed optimizer / Megatron-FSDP
    and recompute. The user's pins hold (interleaving included), and long sequences get context parallelism."""
    megatron_lm.require()
    plans, cases = [], []
    for _name, argv, nodes, connections in REAL_JOBS:
        plan = plan_megatron(argv, nodes=nodes, gpus_per_node=8, connections=connections)
        merged, merge = merged_argv(plan, argv)
        env = {} if connections is None else {CONNECTIONS_ENV: connections}
        plans.append(plan)
        # Without TransformerEngine (a CPU machine), TransformerConfig refuses Megatron's default RoPE fusion.
        cases.append((merged + [NO_ROPE_FUSION], {**env, **merge.env}, nodes * 8))
    report = (*REPORTED, "use_distributed_optimizer", "use_megatron_fsdp", megatron_lm.LAYERS_PER_STAGE)
    results = megatron_lm.validate(cases, report=report)
    failures = []
    for (name, argv, _nodes, _conn), plan, result in zip(REAL_JOBS, plans, results):
        wrong = differences(result, plan)
        if isinstance(wrong, dict):  # the user's pins hold as well
            for flag, dest in PINNED_DESTS.items():
                if flag in argv and str(result["args"][dest]) != argv[argv.index(flag) + 1]:
                    wrong[flag] = (result["args"][dest], argv[argv.index(flag) + 1])
        if wrong:
            failures.append(f"{name}: {wrong}")
    assert failures == [], "\n".join(failures)
    by_name = dict(zip((name for name, *_ in REAL_JOBS), plans))
    assert by_name["llama3-8b-128k"].context_parallel_size > 1  # 128k tokens: context parallelism pays
    assert by_name["llama3-70b-32k"].context_parallel_size > 1


def test_megatron_lm_accepts_a_plan_with_the_precision_aware_optimizer():
    """--use-precision-aware-optimizer with bf16 gradients and moments: the plan keeps the user's distributed
    optimizer, and Megatron-LM's validate_args accepts the merged command line."""
    megatron_lm.require()
    argv = LLAMA2_70B + PRECISION_AWARE
    plan = plan_megatron(argv, nodes=8, gpus_per_node=8, connections="1")
    merged, merge = merged_argv(plan, argv)
    report = ("use_precision_aware_optimizer", "use_distributed_optimizer", "data_parallel_size")
    (result,) = megatron_lm.validate([(merged, {**merge.env, CONNECTIONS_ENV: "1"}, 64)], report=report)
    assert "error" not in result, (plan.uniform_strategy, result)
    assert result["args"]["use_precision_aware_optimizer"] and result["args"]["use_distributed_optimizer"]
    assert plan.training.precision_aware_optimizer and plan.training.exp_avg_dtype == "bf16"
