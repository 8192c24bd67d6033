"""An independent statement of the rules Megatron-LM core_v0.16.1 applies to a command line: its argument
parser (megatron/training/arguments.py), validate_args, the micro-batch calculator, megatron-core's
TransformerConfig, get_num_layers_to_build and the layout parser -- written from those sources, not by
calling uniap's generator, so it can catch the generator's mistakes even where Megatron-LM's own training
package is not available (tests/megatron_lm.py runs that one for real where it is).
"""

from __future__ import annotations

import re
import typing
from dataclasses import fields

import pytest
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

INT_FLAGS = {
    "--tensor-model-parallel-size",
    "--context-parallel-size",
    "--pipeline-model-parallel-size",
    "--micro-batch-size",
    "--global-batch-size",
    "--decoder-first-pipeline-num-layers",
    "--decoder-last-pipeline-num-layers",
    "--num-virtual-stages-per-pipeline-rank",
    "--recompute-num-layers",
    "--cpu-offloading-num-layers",
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--num-query-groups",
    "--ffn-hidden-size",
    "--kv-channels",
    "--seq-length",
    "--max-position-embeddings",
    "--vocab-size",
}
CHOICE_FLAGS = {
    "--recompute-granularity": {"full", "selective"},
    "--recompute-method": {"uniform", "block"},
    "--data-parallel-sharding-strategy": {"no_shard", "optim", "optim_grads", "optim_grads_params"},
    "--ckpt-format": {"torch", "torch_dist", "torch_dcp", "fsdp_dtensor"},
    # TransformerConfig.fp8 / fp8_recipe as Megatron-LM's parser offers them (Fp8Recipe, less 'custom').
    "--fp8-format": {"e4m3", "hybrid"},
    "--fp8-recipe": {"tensorwise", "delayed", "mxfp8", "blockwise"},
    "--fp4-format": {"e2m1"},
    "--fp4-recipe": {"nvfp4"},
    "--normalization": {"LayerNorm", "RMSNorm"},
    # GPTModel(position_embedding_type=...) accepts these (megatron/core/models/gpt/gpt_model.py)
    "--position-embedding-type": set(
        typing.get_args(
            __import__("inspect").signature(GPTModel.__init__).parameters["position_embedding_type"].annotation
        )
    )
    or {"learned_absolute", "rope", "mrope", "yarn", "none"},
}
STR_FLAGS = {"--pipeline-model-parallel-layout"}
SWITCHES = {
    "--sequence-parallel",
    "--use-distributed-optimizer",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--tp-comm-overlap",
    "--fp8-param-gather",
    "--grad-reduce-in-bf16",
    "--use-megatron-fsdp",
    "--use-torch-fsdp2",
    "--no-gradient-accumulation-fusion",
    "--bf16",
    "--fp16",
    "--group-query-attention",
    "--swiglu",
    "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
}
DEPRECATED = {"--model-parallel-size", "--batch-size", "--warmup", "--checkpoint-activations"}


def parse_flags(argv: list[str]) -> dict[str, object]:
    """Megatron-style `--flag value` / `--switch` words -> {flag: value or True}; every word must be a
    flag Megatron-LM core_v0.16.1 defines, given once, with a value of the right type."""
    flags: dict[str, object] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"stray word {flag!r} in {argv}"
        assert flag not in flags, f"{flag} given twice"
        assert flag not in DEPRECATED, f"{flag} is a deprecated Megatron flag (validate_args asserts it absent)"
        if flag in SWITCHES:
            flags[flag] = True
            i += 1
            continue
        assert flag in INT_FLAGS | STR_FLAGS | set(CHOICE_FLAGS), f"{flag} is not a Megatron-LM flag uniap may emit"
        assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{flag} needs a value"
        value = argv[i + 1]
        if flag in INT_FLAGS:
            assert re.fullmatch(r"\d+", value), f"{flag} {value!r} is not an integer"
            flags[flag] = int(value)
        else:
            if flag in CHOICE_FLAGS:
                assert value in CHOICE_FLAGS[flag], f"{flag} {value!r} not in {sorted(CHOICE_FLAGS[flag])}"
            flags[flag] = value
        i += 2
    return flags


def expand_layout(text: str) -> list[str]:
    """A layout string -> one string of layer letters per stage (frameworks.md 1.5: commas are cosmetic,
    `x*n` repeats a letter, `(...)*n` a group, `|` separates stages)."""
    text = text.replace(",", "")
    while "(" in text:
        text = re.sub(r"\(([^()]*)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text, count=1)
    out, i = [], 0
    while i < len(text):
        m = re.match(r"([A-Za-z|])\*(\d+)", text[i:])
        if m:
            out.append(m.group(1) * int(m.group(2)))
            i += m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out).split("|")


def megatron_violations(flags: dict, env: dict[str, str], world: int) -> list[str]:
    """Every rule of frameworks.md 1.4 / 5 that applies to these flags and this world size, as messages."""
    bad = []
    g = flags.get
    tp, pp = g("--tensor-model-parallel-size", 1), g("--pipeline-model-parallel-size", 1)
    cp = g("--context-parallel-size", 1)
    mbs, gbs = g("--micro-batch-size"), g("--global-batch-size")
    layers, hidden, heads = g("--num-layers"), g("--hidden-size"), g("--num-attention-heads")
    ffn, seq = g("--ffn-hidden-size") or 4 * hidden, g("--seq-length")
    for name, v in (
        ("TP", tp),
        ("PP", pp),
        ("CP", cp),
        ("MBS", mbs),
        ("GBS", gbs),
        ("L", layers),
        ("h", hidden),
        ("heads", heads),
        ("seq", seq),
    ):
        if not isinstance(v, int) or v < 1:
            bad.append(f"{name} must be a positive integer (got {v!r})")
    if bad:
        return bad
    # A.1 / C: world % (TP*PP*CP) == 0; DP = W/(TP*PP*CP); GBS % (MBS*DP) == 0 with at least one micro-batch.
    if world % (tp * pp * cp):
        bad.append(f"world {world} % (TP {tp} * PP {pp} * CP {cp}) != 0")
        return bad
    dp = world // (tp * pp * cp)
    if gbs % (mbs * dp) or gbs // (mbs * dp) < 1:
        bad.append(f"GBS {gbs} % (MBS {mbs} * DP {dp}) != 0")
    # B: heads % TP; query groups; ffn % TP; hidden % heads without kv_channels.
    if heads % tp:
        bad.append(f"heads {heads} % TP {tp} != 0")
    groups = g("--num-query-groups") if g("--group-query-attention") else heads
    if "--num-query-groups" in flags and not g("--group-query-attention"):
        bad.append("--num-query-groups without --group-query-attention is ignored by Megatron (MHA)")
    if not (groups % tp == 0 or tp % groups == 0):
        bad.append(f"query groups {groups} and TP {tp}: neither divides the other")
    if heads % groups:
        bad.append(f"heads {heads} % query groups {groups} != 0")
    if ffn % tp:
        bad.append(f"ffn {ffn} % TP {tp} != 0")
    if "--kv-channels" not in flags and hidden % heads:
        bad.append(f"hidden {hidden} % heads {heads} != 0 and no --kv-channels")
    # A.17: max_position_embeddings >= seq_length.
    if g("--max-position-embeddings", 0) < seq:
        bad.append(f"max_position_embeddings {g('--max-position-embeddings')} < seq {seq}")
    # A.20 / C: SP only with TP > 1 (TP 1 silently drops it); the sequence splits over the TP ranks.
    if g("--sequence-parallel"):
        if tp == 1:
            bad.append("--sequence-parallel at TP 1 (Megatron silently drops it: not what was planned)")
        elif (seq // cp) % tp:
            bad.append(f"--sequence-parallel needs (seq {seq} / CP {cp}) % TP {tp} == 0")
    # A.20: TP communication overlap only with sequence parallelism.
    if g("--tp-comm-overlap") and not g("--sequence-parallel"):
        bad.append("--tp-comm-overlap without --sequence-parallel")
    # --fp8-recipe is read only beside --fp8-format (TransformerConfig.fp8 None: no FP8).
    if g("--fp8-recipe") is not None and g("--fp8-format") is None:
        bad.append("--fp8-recipe without --fp8-format (no FP8 runs)")
    if g("--fp4-format") is not None and g("--fp8-format") is not None:
        bad.append("--fp4-format with --fp8-format (validate_args: one of them)")
    # A.17: CP > 1 splits the sequence into 2 * CP chunks.
    if cp > 1 and seq % (2 * cp):
        bad.append(f"CP {cp} needs seq {seq} % (2 * CP) == 0")
    # Pipeline split (A.6-9, B uneven PP and layout, C get_num_layers_to_build).
    first, last = g("--decoder-first-pipeline-num-layers"), g("--decoder-last-pipeline-num-layers")
    layout = g("--pipeline-model-parallel-layout")
    vpp = g("--num-virtual-stages-per-pipeline-rank")
    if vpp is not None:
        # A.6 / B: at most one of layout and virtual-stage flags; interleaving needs PP > 1 and a number of
        # micro-batches that is a multiple of PP; an even split of the layers over PP x v chunks.
        if layout is not None:
            bad.append("--num-virtual-stages-per-pipeline-rank together with a layout")
        if pp < 2:
            bad.append("interleaved schedule with PP 1")
        elif (gbs // (mbs * dp)) % pp:
            bad.append(f"{gbs // (mbs * dp)} micro-batches is not a multiple of PP {pp} (interleaved schedule)")
        if layers % (pp * vpp):
            bad.append(f"num_layers {layers} % (PP {pp} * v {vpp}) != 0")
    if layout is not None:
        if first is not None or last is not None:
            bad.append("a layout cannot be combined with --decoder-first/last-pipeline-num-layers")
        stages = expand_layout(layout)
        flat = "".join(stages)
        if set(flat) - set("ELt"):
            bad.append(f"layout letters {sorted(set(flat) - set('ELt'))} (only E, L, t for a GPT)")
        if len(stages) % pp:
            bad.append(f"layout has {len(stages)} stages, not a multiple of PP {pp}")
        elif len(stages) > pp and (gbs // (mbs * dp)) % pp:
            bad.append("an interleaved layout needs the number of micro-batches to be a multiple of PP")
        if flat.count("E") != 1 or not stages[0].startswith("E"):
            bad.append("layout needs exactly one E, first in stage 0")
        if flat.count("L") != 1 or not stages[-1].endswith("L"):
            bad.append("layout needs exactly one L, last in the last stage")
        if flat.count("t") != layers:
            bad.append(f"layout has {flat.count('t')} decoder layers, --num-layers is {layers}")
    elif first is not None or last is not None:
        given = [x for x in (first, last) if x is not None]
        if pp < 2:
            bad.append("uneven first/last stage flags need PP > 1")
        if any(x <= 0 for x in given):
            bad.append(f"first/last stage layer counts must be > 0 (got {given})")
        mid_layers, mid_stages = layers - sum(given), pp - len(given)
        if bool(mid_layers) != bool(mid_stages):
            bad.append(f"{mid_layers} middle layers but {mid_stages} middle stages")
        elif mid_stages and mid_layers % mid_stages:
            bad.append(f"middle layers {mid_layers} % middle stages {mid_stages} != 0")
    elif layers % pp and vpp is None:
        bad.append(f"even split: num_layers {layers} % PP {pp} != 0")
    # Recompute (A.18-19, B): full needs method + count; selective forbids both.
    gran = g("--recompute-granularity")
    if gran == "full":
        if g("--recompute-method") not in ("uniform", "block") or not g("--recompute-num-layers"):
            bad.append("--recompute-granularity full needs --recompute-method and --recompute-num-layers >= 1")
    elif gran == "selective":
        if "--recompute-method" in flags or "--recompute-num-layers" in flags:
            bad.append("--recompute-granularity selective forbids --recompute-method/--recompute-num-layers")
    elif "--recompute-method" in flags or "--recompute-num-layers" in flags:
        bad.append("--recompute-method/--recompute-num-layers without a recompute granularity")
    # CPU offloading of activations (megatron-core transformer_config.py 1137-1152): fewer layers than the
    # model has, one pipeline stage, no recompute.
    offloaded = g("--cpu-offloading-num-layers", 0)
    if offloaded:
        if not 0 < offloaded < layers:
            bad.append(f"--cpu-offloading-num-layers {offloaded} must be below num_layers {layers}")
        if pp > 1:
            bad.append("CPU offloading with pipeline parallelism")
        if gran is not None:
            bad.append("CPU offloading with activation recompute")
    # A.11: overlap-param-gather needs overlap-grad-reduce and the distributed optimizer or Megatron-FSDP.
    if g("--overlap-param-gather"):
        if not g("--overlap-grad-reduce"):
            bad.append("--overlap-param-gather without --overlap-grad-reduce")
        if not (g("--use-distributed-optimizer") or g("--use-megatron-fsdp")):
            bad.append("--overlap-param-gather without --use-distributed-optimizer or --use-megatron-fsdp")
    # A.14 / A.24 / 5: Megatron-FSDP needs --ckpt-format fsdp_dtensor (and fsdp_dtensor needs Megatron-FSDP),
    # CUDA_DEVICE_MAX_CONNECTIONS != 1; uniap's capability: only at PP = 1.
    mfsdp = bool(g("--use-megatron-fsdp"))
    if mfsdp:
        if g("--ckpt-format") != "fsdp_dtensor":
            bad.append("--use-megatron-fsdp needs --ckpt-format fsdp_dtensor")
        if pp != 1:
            bad.append(f"Megatron-FSDP at PP {pp} (the capability declares FSDP only at PP 1)")
        if env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
            bad.append("Megatron-FSDP with CUDA_DEVICE_MAX_CONNECTIONS=1")
    if g("--ckpt-format") == "fsdp_dtensor" and not mfsdp:
        bad.append("--ckpt-format fsdp_dtensor needs --use-megatron-fsdp")
    # A.12: FSDP2.
    tfsdp = bool(g("--use-torch-fsdp2"))
    if tfsdp:
        if (
            pp != 1
            or g("--use-distributed-optimizer")
            or g("--fp16")
            or not g("--no-gradient-accumulation-fusion")
            or not g("--untie-embeddings-and-output-weights")
            or g("--ckpt-format", "torch_dist") not in ("torch_dist", "torch_dcp")
            or env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1"
        ):
            bad.append("--use-torch-fsdp2 requirements (A.12) not met")
    if mfsdp and tfsdp:
        bad.append("both FSDP implementations")
    # A.22: TP > 1 or CP > 1 (pre-Blackwell) asserts CUDA_DEVICE_MAX_CONNECTIONS == "1" unless FSDP (which warns).
    if (tp > 1 or cp > 1) and not (mfsdp or tfsdp) and env.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        bad.append("TP > 1 or CP > 1 without FSDP needs CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment")
    # A.15: fp16 xor bf16.
    if g("--bf16") and g("--fp16"):
        bad.append("--bf16 and --fp16 together")
    if set(env) - {"CUDA_DEVICE_MAX_CONNECTIONS"}:
        bad.append(f"unexpected environment {sorted(env)}")
    return bad


def expected_stage_counts(flags: dict) -> list[int]:
    """Transformer layers per pipeline stage as Megatron derives them from the flags (frameworks.md 1.4 C)."""
    layers, pp = flags["--num-layers"], flags.get("--pipeline-model-parallel-size", 1)
    vpp = flags.get("--num-virtual-stages-per-pipeline-rank")
    if vpp:
        return [layers // (pp * vpp)] * (pp * vpp)
    if "--pipeline-model-parallel-layout" in flags:
        return [stage.count("t") for stage in expand_layout(flags["--pipeline-model-parallel-layout"])]
    first = flags.get("--decoder-first-pipeline-num-layers")
    last = flags.get("--decoder-last-pipeline-num-layers")
    mid_stages = pp - (first is not None) - (last is not None)
    mid = (layers - (first or 0) - (last or 0)) // mid_stages if mid_stages else 0
    counts = [mid] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def split_encoding(flags: dict) -> str:
    if "--pipeline-model-parallel-layout" in flags:
        return "layout"
    if "--decoder-first-pipeline-num-layers" in flags or "--decoder-last-pipeline-num-layers" in flags:
        return "first/last"
    return "even"


def translation_mismatches(flags: dict, plan: Plan, model: ModelSpec, training: TrainingSpec) -> list[str]:
    """The arguments say what the plan and the model say."""
    s = plan.uniform_strategy
    world = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    g = flags.get
    want = {
        "--tensor-model-parallel-size": s.tp,
        "--context-parallel-size": s.cp if s.cp > 1 else None,
        "--pipeline-model-parallel-size": plan.pipeline_degree,
        "--global-batch-size": training.global_batch_size,
        "--micro-batch-size": plan.micro_batch_all_replicas // s.dp,
        "--num-layers": model.num_layers,
        "--hidden-size": model.hidden_size,
        "--num-attention-heads": model.num_attention_heads,
        "--ffn-hidden-size": model.ffn_hidden_size,
        "--seq-length": training.seq_length,
        "--max-position-embeddings": model.max_position_embeddings,
        "--vocab-size": model.vocab_size,
    }
    bad = [f"{k} {g(k)!r}, expected {v!r}" for k, v in want.items() if g(k) != v]
    dp = world // (s.tp * s.cp * plan.pipeline_degree)
    if dp != s.dp:
        bad.append(f"Megatron's DP {dp} != plan DP {s.dp}")
    if training.global_batch_size // (g("--micro-batch-size") * dp) != plan.micro_batches:
        bad.append("Megatron's micro-batch count differs from the plan's")
    groups = g("--num-query-groups") if g("--group-query-attention") else model.num_attention_heads
    if groups != model.query_groups:
        bad.append(f"query groups {groups}, model has {model.query_groups}")
    if g("--kv-channels", model.hidden_size // model.num_attention_heads) != model.head_dim:
        bad.append("kv channels differ from the model's head dim")
    for flag, cond in (
        ("--swiglu", model.gated_mlp),
        ("--untie-embeddings-and-output-weights", not model.tied_embeddings),
        ("--disable-bias-linear", not model.add_bias),
        ("--sequence-parallel", s.tp > 1),
        ("--bf16", training.precision == "bf16"),
        ("--fp16", training.precision == "fp16"),
        ("--fp8-format", training.fp8),
        ("--fp4-format", training.fp4_recipe is not None),
        ("--tp-comm-overlap", s.tp > 1 and "tp_comm" in (training.overlaps or ())),
    ):
        if bool(g(flag)) != cond:
            bad.append(f"{flag} {'missing' if cond else 'unexpected'}")
    if g("--normalization", "LayerNorm") != {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[model.normalization]:
        bad.append("normalization differs")
    if (g("--position-embedding-type", "learned_absolute") == "rope") != (model.position_embedding == "rope"):
        bad.append("position embedding differs")
    rc = {"none": None, "selective": "selective", "full": "full"}[s.recompute]
    if g("--recompute-granularity") != rc:
        bad.append(f"recompute {g('--recompute-granularity')!r}, plan says {s.recompute}")
    if g("--cpu-offloading-num-layers", 0) != plan.offloaded_layers:
        bad.append(f"offloaded layers {g('--cpu-offloading-num-layers', 0)}, plan says {plan.offloaded_layers}")
    # ZeRO: 1 -> distributed optimizer; 3 -> Megatron-FSDP (optim_grads_params); 0 -> neither.
    zero = 3 if g("--use-megatron-fsdp") else 1 if g("--use-distributed-optimizer") else 0
    if zero != (s.zero if s.shards > 1 else 0):
        bad.append(f"ZeRO stage {zero} in the arguments, plan says {s.zero}")
    if zero == 3 and g("--data-parallel-sharding-strategy") != "optim_grads_params":
        bad.append("Megatron-FSDP as ZeRO-3 must shard optimizer states, gradients and parameters")
    if expected_stage_counts(flags) != plan.stage_layer_counts():
        bad.append(f"stage layers {expected_stage_counts(flags)} != plan {plan.stage_layer_counts()}")
    return bad


# --- megatron-core's own validation --------------------------------------------------------------------


def transformer_config(flags: dict) -> TransformerConfig:
    """TransformerConfig as Megatron-LM's core_transformer_config_from_args builds it from these flags."""
    g = flags.get
    dtype = torch.bfloat16 if g("--bf16") else torch.float16 if g("--fp16") else torch.float32
    return TransformerConfig(
        num_layers=g("--num-layers"),
        hidden_size=g("--hidden-size"),
        num_attention_heads=g("--num-attention-heads"),
        num_query_groups=g("--num-query-groups") if g("--group-query-attention") else None,
        ffn_hidden_size=g("--ffn-hidden-size"),
        kv_channels=g("--kv-channels"),
        tensor_model_parallel_size=g("--tensor-model-parallel-size", 1),
        context_parallel_size=g("--context-parallel-size", 1),
        pipeline_model_parallel_size=g("--pipeline-model-parallel-size", 1),
        sequence_parallel=bool(g("--sequence-parallel")),
        num_layers_in_first_pipeline_stage=g("--decoder-first-pipeline-num-layers"),
        num_layers_in_last_pipeline_stage=g("--decoder-last-pipeline-num-layers"),
        pipeline_model_parallel_layout=g("--pipeline-model-parallel-layout"),
        virtual_pipeline_model_parallel_size=g("--num-virtual-stages-per-pipeline-rank"),
        recompute_granularity=g("--recompute-granularity"),
        recompute_method=g("--recompute-method"),
        recompute_num_layers=g("--recompute-num-layers"),
        cpu_offloading=bool(g("--cpu-offloading-num-layers")),
        cpu_offloading_num_layers=g("--cpu-offloading-num-layers", 0),
        bf16=bool(g("--bf16")),
        fp16=bool(g("--fp16")),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        gated_linear_unit=bool(g("--swiglu")),
        add_bias_linear=not g("--disable-bias-linear"),
        normalization=g("--normalization", "LayerNorm"),
        gradient_accumulation_fusion=not g("--no-gradient-accumulation-fusion"),
        use_cpu_initialization=True,
    )


def core_stage_layers(config: TransformerConfig) -> tuple[list[int], list[int]]:
    """(layers to build, first layer's offset) per pipeline stage -- per (chunk, rank) in placement order when
    interleaved -- from megatron-core."""
    pp = config.pipeline_model_parallel_size
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        # The parsed layout per (rank, chunk); its getters read the chunk from parallel_state, not set up here.
        stages = [(k, i) for k in range(layout.virtual_pipeline_model_parallel_size) for i in range(pp)]
        counts = [layout.layout[i][k].count(LayerType.decoder) for k, i in stages]
        return counts, [sum(counts[:j]) for j in range(len(counts))]
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [(k if vpp else None, i) for k in range(vpp or 1) for i in range(pp)]
    return (
        [get_num_layers_to_build(config, vp_stage=k, pp_rank=i) for k, i in stages],
        [get_transformer_layer_offset(config, vp_stage=k, pp_rank=i) for k, i in stages],
    )


DDP_FLAGS = {
    "--use-distributed-optimizer",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy",
}


def ddp_config(flags: dict) -> DistributedDataParallelConfig:
    """DistributedDataParallelConfig from the same-named arguments (as Megatron-LM's training.py copies them)."""
    known = {f.name for f in fields(DistributedDataParallelConfig)}
    kwargs = {}
    for flag in DDP_FLAGS & set(flags):
        dest = flag[2:].replace("-", "_")
        assert dest in known, f"{flag} has no DistributedDataParallelConfig field {dest}"
        kwargs[dest] = flags[flag]
    return DistributedDataParallelConfig(**kwargs)
