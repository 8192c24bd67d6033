"""The Megatron-LM arguments uniap emits, checked against Megatron's rules over many plans.

For every plan of the grid (tests/megatron_plans.py), `megatron_launch(plan).args + model_args(model,
training)` is checked three ways:

1. `megatron_violations` (tests/megatron_rules.py): an independent re-statement of the rules a plan must
   satisfy in Megatron-LM core_v0.16.1, plus the translation (the arguments say what the plan and the model
   say).
2. megatron-core's own `PipelineParallelLayerLayout` parses an emitted layout, and its per-stage layer
   counts must equal `plan.stage_layer_counts()`.
3. megatron-core's `TransformerConfig` is built from the emitted values the way Megatron-LM's
   `core_transformer_config_from_args` does, so its `__post_init__` validation runs for real; its
   `get_num_layers_to_build` / layer offsets per pipeline rank must match the plan's stages.

Also: the split encoder on splits the evaluator cannot produce (empty first/last stage), and plans Megatron
cannot run refused. Megatron-LM's own parse_args + validate_args on the same grid: test_megatron_lm.py.
"""

from __future__ import annotations

import json

import pytest
from megatron_plans import ALL_JOBS, JOB_PARAMS, emitted, eval_job, get_plan, run_uniap
from uniap.errors import SpecError
from uniap.plan import Plan

from uniap_megatron.args import job_from_args, megatron_launch, pipeline_split_args

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from sweep import SWEEP
from megatron_rules import (
    core_stage_layers,
    ddp_config,
    expand_layout,
    expected_stage_counts,
    megatron_violations,
    parse_flags,
    split_encoding,
    transformer_config,
    translation_mismatches,
)

# megatron-core warns about Apex/TE being absent and about TransformerConfig defaults; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron")


@pytest.mark.parametrize("name,argv", JOB_PARAMS)
def test_arguments_follow_megatron_rules(name, argv):
    plan = get_plan(name, argv)
    words, env, model, training = emitted(plan)
    flags = parse_flags(words)
    world = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    assert megatron_violations(flags, env, world) == [], words
    assert translation_mismatches(flags, plan, model, training) == [], words


@pytest.mark.parametrize("name,argv", JOB_PARAMS)
def test_megatron_core_accepts_arguments(name, argv):
    plan = get_plan(name, argv)
    words, _env, model, _training = emitted(plan)
    flags = parse_flags(words)
    counts = plan.stage_layer_counts()
    if "--pipeline-model-parallel-layout" in flags:  # megatron-core's parser (frameworks.md 1.5)
        layout = PipelineParallelLayerLayout(flags["--pipeline-model-parallel-layout"], plan.pipeline_degree)
        v = layout.virtual_pipeline_model_parallel_size
        assert v == plan.virtual_stages
        layout.validate_layer_layout(num_layers=model.num_layers, mtp_num_layers=None)
        chunks = [(k, i) for k in range(v) for i in range(plan.pipeline_degree)]  # placement order
        assert [layout.layout[i][k].count(LayerType.decoder) for k, i in chunks] == counts
        assert layout.layout[0][0][0] == LayerType.embedding and layout.layout[-1][-1][-1] == LayerType.loss
    config = transformer_config(flags)  # __post_init__ validates
    assert config.num_query_groups == model.query_groups
    assert config.ffn_hidden_size == model.ffn_hidden_size and config.kv_channels == model.head_dim
    assert config.sequence_parallel == (plan.uniform_strategy.tp > 1)
    assert config.virtual_pipeline_model_parallel_size == (plan.virtual_stages if plan.virtual_stages > 1 else None)
    build, offsets = core_stage_layers(config)
    assert build == counts
    assert offsets == [sum(counts[:i]) for i in range(len(counts))]
    ddp_config(flags)


@pytest.mark.parametrize("name,argv", JOB_PARAMS)
def test_arguments_parse_back_to_the_job(name, argv):
    """job_from_args(arguments) recovers the model, the training job and, as pins, the plan's choices."""
    plan = get_plan(name, argv)
    words, _env, model, training = emitted(plan)
    job = job_from_args(words)
    m = job.model
    for field in (
        "architecture",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "vocab_size",
        "gated_mlp",
        "normalization",
        "tied_embeddings",
        "max_position_embeddings",
        "add_bias",
        "head_dim",
        "query_groups",
    ):
        assert getattr(m, field) == getattr(model, field), field
    assert (m.position_embedding == "rope") == (model.position_embedding == "rope")
    assert (job.training.global_batch_size, job.training.seq_length, job.training.precision) == (
        training.global_batch_size,
        training.seq_length,
        training.precision,
    )
    s = plan.uniform_strategy
    pins = job.pins
    assert (pins.tp, pins.pipeline_degree, pins.micro_batch_per_replica) == (
        s.tp,
        plan.pipeline_degree,
        plan.micro_batch_all_replicas // s.dp,
    )
    assert pins.zero == (s.zero if s.shards > 1 and s.zero else None)
    assert pins.recompute == (None if s.recompute == "none" else s.recompute)


CUSTOM_MODEL = """\
name: kv-mqa-decoder
architecture: decoder
num_layers: 18
hidden_size: 3072
num_attention_heads: 16
num_query_groups: 1
kv_channels: 256
ffn_hidden_size: 24576
vocab_size: 256000
gated_mlp: true
normalization: rmsnorm
tied_embeddings: true
position_embedding: rope
max_position_embeddings: 8192
add_bias: false
"""


@pytest.mark.parametrize("pins", [["--tp", "4"], ["--pp", "4"], ["--zero", "3"]])
def test_explicit_kv_channels_and_multi_query_attention(tmp_path, pins):
    """A model whose head dim is not hidden/heads (--kv-channels) with one query group (MQA, TP > groups),
    tied embeddings: the same three checks as the grid."""
    path = tmp_path / "model.yaml"
    path.write_text(CUSTOM_MODEL)
    name = f"custom-{'-'.join(pins)}"
    plan = get_plan(
        name,
        [
            "plan",
            "--model",
            str(path),
            "--cluster",
            "dgx-a100-80g",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "32",
            "--seq-length",
            "4096",
            "--target",
            "megatron",
            *pins,
        ],
    )
    words, env, model, training = emitted(plan)
    flags = parse_flags(words)
    assert flags["--kv-channels"] == 256 and flags["--num-query-groups"] == 1 and flags["--group-query-attention"]
    assert "--untie-embeddings-and-output-weights" not in flags
    assert megatron_violations(flags, env, 8) == []
    assert translation_mismatches(flags, plan, model, training) == []
    config = transformer_config(flags)
    assert (config.kv_channels, config.num_query_groups) == (256, 1)
    assert core_stage_layers(config)[0] == plan.stage_layer_counts()
    job = job_from_args(words)
    assert (job.model.kv_channels, job.model.num_query_groups, job.model.tied_embeddings) == (256, 1, True)


@SWEEP
def test_grid_covers_every_split_encoding_and_parallelism():
    """The grid is not vacuous: all three split encodings (first/last with both ends, only the first,
    only the last), TP, PP, DP, ZeRO-1, Megatron-FSDP, both recompute modes and all precisions occur."""
    seen: dict[str, set] = {k: set() for k in ("split", "tp", "pp", "dp", "zero", "recompute", "precision")}
    for name, argv in ALL_JOBS:
        plan = get_plan(name, argv)
        flags = parse_flags(emitted(plan)[0])
        s = plan.uniform_strategy
        seen["split"].add(split_encoding(flags))
        seen["tp"].add(s.tp)
        seen["pp"].add(plan.pipeline_degree)
        seen["dp"].add(s.dp)
        seen["zero"].add(s.zero)
        seen["recompute"].add(s.recompute)
        seen["precision"].add(plan.training.precision)
        if split_encoding(flags) == "first/last":
            seen["split"].add(
                "first only"
                if "--decoder-last-pipeline-num-layers" not in flags
                else "last only"
                if "--decoder-first-pipeline-num-layers" not in flags
                else "first+last"
            )
    assert seen["split"] == {"even", "first/last", "layout", "first only", "last only", "first+last"}
    assert {1, 2, 4, 8} <= seen["tp"] and {1, 2, 4, 8} <= seen["pp"] and {1, 2} <= seen["dp"]
    assert seen["zero"] >= {0, 1, 3}
    assert seen["recompute"] == {"none", "selective", "full"}
    assert seen["precision"] == {"bf16", "fp16", "fp32"}


def test_rule_checker_catches_broken_arguments():
    """The checker above is not vacuous: each mutation of good arguments breaks the rule it targets."""
    plan = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7"))
    words, env, _model, _training = emitted(plan)
    good = parse_flags(words)
    assert megatron_violations(good, env, 8) == []

    def broken(**changes):
        f = dict(good)
        for k, v in changes.items():
            flag = "--" + k.replace("_", "-")
            if v is None:
                f.pop(flag, None)
            else:
                f[flag] = v
        return megatron_violations(f, env, 8)

    assert broken(tensor_model_parallel_size=3)  # world % (TP*PP)
    assert broken(global_batch_size=15)  # GBS % (MBS*DP)
    assert broken(decoder_first_pipeline_num_layers=10)  # middle layers don't split evenly
    assert broken(
        pipeline_model_parallel_size=8,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        num_layers=30,
    )  # 30 % 8, even split
    assert broken(pipeline_model_parallel_layout="Et*9|t*8|t*8|t*7L")  # layout + first/last
    assert broken(
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        pipeline_model_parallel_layout="Et*9|t*8|t*8|t*6L",
    )  # 31 t for 32 layers
    assert broken(
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        pipeline_model_parallel_layout="t*9|Et*8|t*8|t*7L",
    )  # E not first
    assert broken(recompute_granularity="full")  # no method / count
    assert broken(recompute_granularity="selective", recompute_method="uniform")
    assert broken(overlap_param_gather=True)  # without grad-reduce / dist-opt
    assert broken(use_megatron_fsdp=True)  # no fsdp_dtensor, PP > 1
    assert broken(fp16=True)  # with --bf16
    assert broken(sequence_parallel=True)  # at TP 1
    assert broken(num_attention_heads=30)  # hidden % heads
    assert broken(group_query_attention=True, num_query_groups=5)  # heads % groups
    assert broken(
        group_query_attention=True,
        num_query_groups=3,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=4,
        global_batch_size=16,
        micro_batch_size=1,
    )  # 3 vs TP 2
    assert broken(ffn_hidden_size=11007, tensor_model_parallel_size=2, micro_batch_size=1)  # ffn % TP
    assert broken(max_position_embeddings=1024)  # < seq 2048
    assert broken(recompute_num_layers=1)  # without a granularity
    words_tp, env_tp, *_ = emitted(get_plan(*eval_job("-1x8-tp-2-pp-4-split-9,8,8,7")))
    assert megatron_violations(parse_flags(words_tp), {}, 8)  # TP 2 without CUDA_DEVICE_MAX_CONNECTIONS=1
    f = parse_flags(words_tp)
    f["--seq-length"] = 2047
    assert megatron_violations(f, env_tp, 8)  # SP with seq % TP != 0


# --- splits the evaluator cannot make (an empty first or last stage) ----------------------------------


@pytest.mark.parametrize(
    "counts",
    [
        [0, 16, 16],
        [16, 16, 0],
        [0, 8, 8, 8, 8],
        [8, 8, 8, 8, 0],
        [0, 31, 1],
        [1, 31, 0],
        [0, 32],
        [32, 0],
        [0, 4, 4, 4, 4, 4, 3, 1],
        [5, 0, 27],
        [9, 8, 8, 7],
        [8, 8, 8, 8],
        [3, 13, 13, 3],
        [1, 2, 3, 26],
    ],
)
def test_split_encoding_of_any_counts_is_valid_for_megatron_core(counts):
    """pipeline_split_args on arbitrary counts (zeros included: the planner may leave the embedding alone
    on the first stage) gives arguments megatron-core accepts and that build exactly these counts."""
    layers, pp = sum(counts), len(counts)
    flags = parse_flags(
        [
            "--num-layers",
            str(layers),
            "--hidden-size",
            "256",
            "--num-attention-heads",
            "8",
            "--seq-length",
            "128",
            "--max-position-embeddings",
            "128",
            "--pipeline-model-parallel-size",
            str(pp),
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "4",
            *pipeline_split_args(counts),
        ]
    )
    assert megatron_violations(flags, {}, pp) == []
    assert expected_stage_counts(flags) == counts
    if 0 in (counts[0], counts[-1]):
        assert split_encoding(flags) == "layout"  # the first/last flags must be > 0
    build, offsets = core_stage_layers(transformer_config(flags))
    assert build == counts and offsets == [sum(counts[:i]) for i in range(pp)]


def test_planner_plan_with_an_embedding_only_stage(tmp_path):
    """A plan whose first stage holds only the embedding (the planner can choose this) becomes a layout
    that starts with a stage of just E."""
    plan = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7"))
    data = plan.to_dict()
    transformer = [lp for lp in data["layers"] if lp["kind"] == "transformer"]
    for lp in data["layers"]:  # embedding alone on stage 0; 32 transformer layers 11/11/10 on 1..3
        if lp["kind"] == "transformer":
            lp["stage"] = 1 + min(transformer.index(lp) // 11, 2)
        elif lp["kind"] != "embedding":
            lp["stage"] = 3
    moved = Plan.from_dict(data)
    assert moved.stage_layer_counts() == [0, 11, 11, 10]
    flags = parse_flags(emitted(moved)[0])
    assert expand_layout(flags["--pipeline-model-parallel-layout"])[0] == "E"
    assert megatron_violations(flags, megatron_launch(moved).env, 8) == []
    build, _ = core_stage_layers(transformer_config(flags))
    assert build == [0, 11, 11, 10]


@pytest.mark.parametrize("split, empty", [("16,0,16", True), ("0,16,16", False), ("16,16,0", False)])
def test_evaluate_refuses_an_empty_stage(split, empty):
    """A stage without layers is refused; the embedding or the loss alone on an end stage is Megatron's layout
    that counts them as layers (Megatron-Bridge's account_for_embedding/loss_in_pipeline_split)."""
    rc, _out, err = run_uniap(
        [
            "evaluate",
            "--model",
            "llama2-7b",
            "--gpus-per-node",
            "6",
            "--global-batch-size",
            "12",
            "--seq-length",
            "1024",
            "--target",
            "megatron",
            "--pp",
            "3",
            "--split",
            split,
        ]
    )
    assert (rc == 2 and "empty" in err) if empty else rc == 0, err


# --- plans Megatron cannot run are refused -------------------------------------------------------------


def test_launch_refuses_a_generic_plan_with_fsdp_and_pipelining():
    rc, out, err = run_uniap(
        [
            "evaluate",
            "--model",
            "llama2-7b",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "16",
            "--seq-length",
            "2048",
            "--target",
            "generic",
            "--pp",
            "2",
            "--zero",
            "3",
        ]
    )
    assert rc == 0, err
    with pytest.raises(SpecError, match="not runnable by Megatron-LM"):
        megatron_launch(Plan.from_dict(json.loads(out)))


@pytest.mark.parametrize("change", [{"tp": 2, "dp": 1, "zero": 0}, {"recompute": "full"}])
def test_launch_refuses_non_uniform_transformer_strategies(change):
    """Megatron has one TP degree and one recompute setting for all layers."""
    data = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7")).to_dict()
    layer = next(lp for lp in data["layers"] if lp["kind"] == "transformer" and lp["stage"] == 1)
    layer["strategy"].update(change)
    with pytest.raises(SpecError):
        megatron_launch(Plan.from_dict(data))


# --- sequence parallelism needs seq % TP == 0 (the bug this file found) -------------------------------


def test_megatron_core_rejects_sequence_parallel_scatter_of_an_odd_sequence():
    """The rule, from megatron-core itself: the sequence-parallel scatter asserts dim 0 % TP == 0."""
    from megatron.core.tensor_parallel.mappings import _split_along_first_dim

    class Group:  # the two methods the split reads from a process group
        def size(self):
            return 2

        def rank(self):
            return 0

    assert _split_along_first_dim(torch.zeros(1000, 1, 8), Group()).shape[0] == 500
    with pytest.raises(AssertionError, match="divisible by tensor parallel size"):
        _split_along_first_dim(torch.zeros(1001, 1, 8), Group())


@pytest.mark.parametrize(
    "command,extra",
    [
        ("evaluate", ["--tp", "2"]),
        ("plan", ["--tp", "4"]),
    ],
)
def test_tp_not_dividing_the_sequence_never_reaches_megatron(command, extra):
    """TP 2 or 4 with a 1001-token sequence would get --sequence-parallel, which megatron-core rejects at
    the first forward. Either the core refuses to make the plan (it now knows the rule), or
    megatron_launch refuses the plan it made; the arguments are never emitted."""
    rc, out, err = run_uniap(
        [
            command,
            "--model",
            "gpt3-1.3b",
            "--gpus-per-node",
            "4",
            "--global-batch-size",
            "8",
            "--seq-length",
            "1001",
            "--target",
            "megatron",
            *extra,
        ]
    )
    if rc != 0:
        assert rc in (2, 3) and "Traceback" not in err and "internal error" not in err
        return
    plan = Plan.from_dict(json.loads(out))
    assert plan.uniform_strategy.tp > 1
    with pytest.raises(SpecError, match="sequence"):
        megatron_launch(plan)


@pytest.mark.parametrize("seq", [1001, 2047, 2049])
def test_launch_refuses_a_plan_whose_tp_does_not_divide_the_sequence(seq):
    """A plan made elsewhere (an older uniap, an edited file) with TP 2 and an odd sequence is refused
    with an error that names the rule, instead of arguments that crash in the sequence-parallel scatter."""
    data = get_plan(*eval_job("-1x8-tp-2-pp-4-split-9,8,8,7")).to_dict()
    data["training"]["seq_length"] = seq
    with pytest.raises(SpecError, match="seq_length % TP") as exc:
        megatron_launch(Plan.from_dict(data))
    assert "divisible by 2" in exc.value.hint
    data["training"]["seq_length"] = seq - seq % 2
    assert "--sequence-parallel" in megatron_launch(Plan.from_dict(data)).args


def test_grid_ids_are_unique():
    names = [n for n, _ in ALL_JOBS]
    assert len(names) == len(set(names)) >= 150
