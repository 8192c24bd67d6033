"""A Megatron-LM command line read for planning (`job_from_args`): the model, the batch and the pins,
following Megatron-LM core_v0.16.1's spellings and defaults; the world size from the launcher; the model
arguments uniap writes for a spec.
"""

from __future__ import annotations

import importlib.util

import pytest
from megatron_argv import SMALLEST_ARGV
from uniap.errors import SpecError
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import TrainingSpec

from uniap_megatron.args import job_from_args, model_args, world_size
from uniap_megatron.planning import plan_megatron
from uniap_megatron.environment import fused_kernels_available


# Llama-2-70B pretraining with pretrain_gpt.py (Megatron-LM examples style): GQA, SwiGLU, RMSNorm, RoPE,
# untied embeddings, no bias, plus many flags uniap does not read.
LLAMA2_70B_ARGV = """
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
--group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 4096
--tokenizer-type Llama2Tokenizer --tokenizer-model /data/llama2/tokenizer.model --vocab-size 32000
--position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
--untie-embeddings-and-output-weights --disable-bias-linear --no-position-embedding
--no-masked-softmax-fusion --attention-dropout 0.0 --hidden-dropout 0.0
--micro-batch-size 1 --global-batch-size 1024 --train-iters 250000 --lr 3.0e-4 --min-lr 3.0e-5
--lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
--clip-grad 1.0 --init-method-std 0.02 --bf16 --use-flash-attn --recompute-activations
--data-path 1.0 /data/redpajama/text_document --split 99,1,0 --log-interval 10 --save-interval 1000
--eval-interval 1000 --eval-iters 10 --save /ckpt --load /ckpt --distributed-backend nccl
""".split()


def test_job_from_llama2_command_line():
    job = job_from_args(LLAMA2_70B_ARGV, name="llama2-70b-cli")
    m = job.model
    assert (m.name, m.architecture, m.num_layers, m.hidden_size, m.num_attention_heads) == (
        "llama2-70b-cli",
        "decoder",
        80,
        8192,
        64,
    )
    assert (m.num_query_groups, m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == (8, 28672, 32000, 4096)
    assert m.gated_mlp and m.normalization == "rmsnorm" and m.position_embedding == "rope"
    assert not m.tied_embeddings and not m.add_bias and m.dropout == 0.0
    assert m.head_dim == 128
    preset = MODEL_PRESETS["llama2-70b"]
    for field in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "vocab_size",
        "gated_mlp",
        "normalization",
        "tied_embeddings",
        "position_embedding",
        "max_position_embeddings",
        "add_bias",
    ):
        assert getattr(m, field) == getattr(preset, field), field
    t = job.training
    assert (t.global_batch_size, t.seq_length, t.precision) == (1024, 4096, "bf16")
    p = job.pins
    assert (p.tp, p.pipeline_degree, p.zero, p.recompute, p.micro_batch_per_replica) == (8, 4, 1, "selective", 1)


def test_job_from_args_pins_only_what_was_given():
    argv = [
        "--num-layers",
        "24",
        "--hidden-size",
        "2048",
        "--num-attention-heads",
        "16",
        "--seq-length",
        "2048",
        "--max-position-embeddings",
        "2048",
        "--global-batch-size",
        "512",
    ]
    job = job_from_args(argv)
    p = job.pins
    assert (p.tp, p.pipeline_degree, p.zero, p.recompute, p.micro_batch_per_replica) == (None,) * 5
    m = job.model
    assert m.ffn_hidden_size == 4 * 2048 and m.num_query_groups is None and m.query_groups == 16
    assert m.tied_embeddings and m.add_bias and m.normalization == "layernorm" and m.position_embedding == "learned"
    assert job.training.precision == "fp32"
    # An explicit degree is a pin, even the default value 1.
    p = job_from_args(argv + ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]).pins
    assert (p.tp, p.pipeline_degree) == (1, 2)
    assert (
        job_from_args(
            argv + ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        ).pins.recompute
        == "full"
    )
    assert job_from_args(argv + ["--use-torch-fsdp2"]).pins.zero == 3
    assert job_from_args(argv + ["--use-megatron-fsdp", "--use-distributed-optimizer"]).pins.zero == 3
    assert job_from_args(argv + ["--fp16"]).training.precision == "fp16"


def test_job_from_args_follows_megatron_defaults():
    base = [
        "--num-layers",
        "32",
        "--hidden-size",
        "4096",
        "--num-attention-heads",
        "32",
        "--seq-length",
        "4096",
        "--global-batch-size",
        "64",
    ]
    # --num-query-groups reaches the model only with --group-query-attention (frameworks.md 1.3).
    assert job_from_args(base + ["--num-query-groups", "8"]).model.num_query_groups is None
    assert job_from_args(base + ["--group-query-attention"]).model.num_query_groups == 1  # argparse default 1
    # --swiglu without --ffn-hidden-size: int((4h * 2/3) / 64) * 64 (arguments.py:803-811).
    assert job_from_args(base + ["--swiglu"]).model.ffn_hidden_size == int((4 * 4096 * 2 / 3) / 64) * 64 == 10880
    # max_position_embeddings defaults to the sequence; --padded-vocab-size wins over --vocab-size.
    job = job_from_args(base + ["--vocab-size", "32000", "--padded-vocab-size", "32768"])
    assert job.model.max_position_embeddings == 4096 and job.model.vocab_size == 32768
    # No abbreviations (Megatron's parser has allow_abbrev=False): --num-layer is not --num-layers.
    with pytest.raises(SpecError):
        job_from_args(["--num-layer", "32"] + base[2:])


def test_job_from_args_plans_with_the_kernels_of_this_environment():
    """The plugin and `uniap-megatron run` plan where the job runs: without Transformer Engine or Apex (as here)
    megatron-core steps with torch's foreach AdamW, and the plan must count its temporary."""
    job = job_from_args(
        [
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "128",
            "--global-batch-size",
            "8",
        ]
    )
    assert job.training.fused_kernels == fused_kernels_available()
    if importlib.util.find_spec("transformer_engine") is None and importlib.util.find_spec("apex") is None:
        assert job.training.fused_kernels is False


@pytest.mark.parametrize(
    "drop", ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--global-batch-size"]
)
def test_job_from_args_requires_the_shape_and_batch(drop):
    argv = list(SMALLEST_ARGV)
    i = argv.index(drop)
    with pytest.raises(SpecError, match=drop):
        job_from_args(argv[:i] + argv[i + 2 :])


def test_job_from_args_rejects_bf16_with_fp16():
    with pytest.raises(SpecError, match="mutually exclusive"):
        job_from_args([*SMALLEST_ARGV, "--bf16", "--fp16"])


# --- world size from the launcher ---------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_world_size_from_launcher_flags_wins(clean_env):
    clean_env.setenv("WORLD_SIZE", "64")
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    assert world_size(2, 4) == (2, 4)


@pytest.mark.parametrize(
    "world,local,expected",
    [
        ("16", "8", (2, 8)),
        ("32", "8", (4, 8)),
        ("8", "8", (1, 8)),
        ("4", None, (1, 4)),
        ("6", "4", (1, 6)),
        ("8", "0", (1, 8)),
        ("8", "", (1, 8)),
    ],
)
def test_world_size_from_torchrun_environment(clean_env, world, local, expected):
    clean_env.setenv("WORLD_SIZE", world)
    if local is not None:
        clean_env.setenv("LOCAL_WORLD_SIZE", local)
    assert world_size() == expected


@pytest.mark.parametrize("world", [None, "", "0"])
def test_world_size_unknown_is_an_error(clean_env, world):
    if world is not None:
        clean_env.setenv("WORLD_SIZE", world)
    with pytest.raises(SpecError, match="world size"):
        world_size()


def test_model_args_refuses_non_decoder():
    with pytest.raises(SpecError, match="decoder"):
        model_args(MODEL_PRESETS["bert-large"], TrainingSpec(global_batch_size=8, seq_length=512))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--expert-model-parallel-size", "4"),
        ("--num-layers-per-virtual-pipeline-stage", "4"),
        ("--num-experts", "8"),
    ],
)
def test_parallelism_uniap_does_not_plan_is_refused_by_name(flag, value):
    """Planning without it would price a configuration other than the one Megatron-LM runs."""
    argv = list(SMALLEST_ARGV)
    with pytest.raises(SpecError, match=f"{flag} {value}: uniap does not plan this parallelism yet") as err:
        job_from_args(argv + [flag, value])
    if flag == "--num-layers-per-virtual-pipeline-stage":
        assert "--num-virtual-stages-per-pipeline-rank" in err.value.hint  # what to say instead
    if flag == "--expert-model-parallel-size":
        job_from_args(argv + [flag, "1"])  # Megatron's default is no such parallelism: nothing to refuse


def test_virtual_stages_per_rank_is_a_pin_with_an_even_split():
    """Megatron takes no layout beside --num-virtual-stages-per-pipeline-rank, so the plan keeps it even."""
    pins = job_from_args([*SMALLEST_ARGV, "--num-virtual-stages-per-pipeline-rank", "2"]).pins
    assert pins.virtual_stages == 2 and pins.even_split


def test_virtual_stages_that_cannot_split_the_layers_are_refused_with_the_rule():
    """The issue's 26 layers with PP 8 and 2 chunks per rank: no even split exists, and uniap says why
    instead of emitting a layout beside the flag (which Megatron-LM refuses)."""
    argv = [*LLAMA2_70B_ARGV, "--num-virtual-stages-per-pipeline-rank", "2"]
    argv[argv.index("--num-layers") + 1] = "26"
    argv[argv.index("--tensor-model-parallel-size") + 1] = "1"
    with pytest.raises(SpecError, match="split the 26 transformer layers evenly into pipeline degree x 2 chunks"):
        plan_megatron(argv, nodes=8, gpus_per_node=8)


def test_context_parallel_size_is_a_pin():
    """--context-parallel-size is planned: the user's value is kept as a constraint, not refused or ignored."""
    assert job_from_args([*SMALLEST_ARGV, "--context-parallel-size", "2"]).pins.cp == 2
    assert job_from_args(list(SMALLEST_ARGV)).pins.cp is None


@pytest.mark.parametrize(
    "optimizer, expected", [("adam", "adam"), ("sgd", "sgd"), ("muon", "muon"), ("dist_muon", "muon")]
)
def test_the_users_optimizer_reaches_the_training_spec(optimizer, expected):
    argv = [*SMALLEST_ARGV, "--optimizer", optimizer]
    job = job_from_args(argv)
    assert job.training.optimizer == expected
    assert ("--optimizer" in model_args(job.model, job.training)) == (expected != "adam")
