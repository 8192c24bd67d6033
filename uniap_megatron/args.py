"""Plan <-> Megatron-LM (core_v0.16.1) arguments: a thin translation both ways.

plan -> arguments: parallel sizes (TP, CP, PP), batch sizes, sequence parallelism, distributed optimizer or
Megatron-FSDP, recompute, activations offloaded to the host, the pipeline split (even,
--decoder-first/last-pipeline-num-layers, or a full --pipeline-model-parallel-layout), precision; the
environment Megatron needs (CUDA_DEVICE_MAX_CONNECTIONS). arguments -> model spec: what the planner needs from a
pretraining command line. Flag spellings and rules: Megatron-LM core_v0.16.1 megatron/training/arguments.py
(add_megatron_arguments, validate_args).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from uniap.cost.strategy import Pins
from uniap.errors import SpecError
from uniap.model.spec import PARAM_GATHER_OVERLAP, TP_COMM_OVERLAP, ModelSpec, TrainingSpec
from uniap.plan import Plan

from . import flags as F
from .capability import CONNECTIONS_ENV, FSDP_CONNECTIONS, MEGATRON, MUON, TP_CONNECTIONS
from .environment import fused_kernels_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MegatronLaunch:
    """The parallel arguments of a plan and the environment the ranks need."""

    args: list[str]
    env: dict[str, str]


def pipeline_split_args(counts: list[int], virtual_stages: int = 1) -> list[str]:
    """Megatron flags for transformer layers per stage: none when even, first/last counts when only the
    ends differ (both > 0, equal middles), otherwise a full layout (embedding first, loss last). Interleaved
    (`counts` per model chunk, PP x v of them): --num-virtual-stages-per-pipeline-rank when even, else a layout
    of all the chunks (Megatron derives v from it; it takes no virtual-stage flag beside a layout)."""
    pp = len(counts)
    if virtual_stages > 1:
        if len(set(counts)) == 1:
            return F.VIRTUAL_STAGES_PER_RANK.tokens(virtual_stages)
        return _layout(counts)
    if pp == 1 or len(set(counts)) == 1:
        return []
    first, middle, last = counts[0], counts[1:-1], counts[-1]
    if first > 0 and last > 0 and len(set(middle)) <= 1 and (not middle or middle[0] > 0):
        flags = []
        if not middle or first != middle[0]:
            flags += F.FIRST_STAGE_LAYERS.tokens(first)
        if not middle or last != middle[0]:
            flags += F.LAST_STAGE_LAYERS.tokens(last)
        return flags
    return _layout(counts)


def _layout(counts: list[int]) -> list[str]:
    """--pipeline-model-parallel-layout with `counts` transformer layers per stage, the embedding first, the
    loss last."""
    stages = [("t*%d" % n) if n else "" for n in counts]
    stages[0] = "E" + ("," + stages[0] if stages[0] else "")
    stages[-1] = (stages[-1] + "," if stages[-1] else "") + "L"
    return F.PIPELINE_LAYOUT.tokens("|".join(stages))


def megatron_launch(plan: Plan) -> MegatronLaunch:
    """Arguments for pretrain_gpt.py-style scripts that realize `plan` (raises if Megatron cannot)."""
    problems = MEGATRON.violations([(lp.kind, lp.strategy) for lp in plan.layers], plan.pipeline_degree)
    if problems:
        raise SpecError(
            f"plan (target '{plan.target}') is not runnable by Megatron-LM: {problems[0]}",
            "re-plan with --target megatron",
        )
    s = plan.uniform_strategy
    if s is None:
        raise SpecError("plan has no transformer layers for Megatron-LM to run")
    pp = plan.pipeline_degree
    seq = plan.training.seq_length
    if s.tp > 1 and seq % s.tp:
        # The plan is priced with sequence parallelism at TP > 1; Megatron's sequence-parallel scatter
        # asserts that the sequence splits evenly over the TP ranks (megatron/core/tensor_parallel/mappings.py).
        raise SpecError(
            f"plan has tensor parallelism {s.tp}, which does not divide the sequence length {seq}: "
            "Megatron-LM's sequence parallelism needs seq_length % TP == 0",
            f"use a sequence length divisible by {s.tp}, or re-plan with --tp pinned to a divisor of {seq}",
        )
    if s.cp > 1 and seq % (2 * s.cp):
        raise SpecError(
            f"plan has context parallelism {s.cp}, which does not split the sequence length {seq} into 2 x CP "
            "chunks (Megatron-LM validate_args)",
            "re-plan for this sequence length",
        )
    args = F.TENSOR_PARALLEL.tokens(s.tp) + (F.CONTEXT_PARALLEL.tokens(s.cp) if s.cp > 1 else [])
    args += (
        F.PIPELINE_PARALLEL.tokens(pp)
        + F.MICRO_BATCH_SIZE.tokens(plan.micro_batch_per_replica)
        + F.GLOBAL_BATCH_SIZE.tokens(plan.training.global_batch_size)
    )
    args += pipeline_split_args(plan.stage_layer_counts(), plan.virtual_stages)
    overlaps = plan.training.overlaps or ()
    if s.tp > 1:
        args += F.SEQUENCE_PARALLEL.tokens()
        args += F.TP_COMM_OVERLAP.tokens() if TP_COMM_OVERLAP in overlaps else []
    fsdp = s.zero == 3 and s.shards > 1
    if s.zero == 1 and s.shards > 1:
        args += F.DISTRIBUTED_OPTIMIZER.tokens() + F.OVERLAP_GRAD_REDUCE.tokens()
        args += F.OVERLAP_PARAM_GATHER.tokens() if PARAM_GATHER_OVERLAP in overlaps else []
    elif fsdp:
        args += (
            F.MEGATRON_FSDP.tokens()
            + F.SHARDING_STRATEGY.tokens(F.OPTIM_GRADS_PARAMS)
            + F.NO_GRAD_ACCUMULATION_FUSION.tokens()
            + F.DISTRIBUTED_OPTIMIZER.tokens()
            + F.CHECKPOINT_FORMAT.tokens(F.FSDP_DTENSOR)
        )
    elif s.shards > 1 and plan.training.optimizer != MUON:  # Muon: validate_args asserts no overlap
        args += F.OVERLAP_GRAD_REDUCE.tokens()
    if s.recompute == F.FULL:
        args += (
            F.RECOMPUTE_GRANULARITY.tokens(F.FULL)
            + F.RECOMPUTE_METHOD.tokens(F.UNIFORM)
            + F.RECOMPUTE_NUM_LAYERS.tokens(1)
        )
    elif s.recompute == F.SELECTIVE:
        args += F.RECOMPUTE_GRANULARITY.tokens(F.SELECTIVE)
    args += F.CPU_OFFLOADING_LAYERS.tokens(plan.offloaded_layers) if plan.offloaded_layers else []
    args += {"bf16": F.BF16.tokens(), "fp16": F.FP16.tokens()}.get(plan.training.precision, [])
    if plan.training.fp8:
        args += F.FP8_FORMAT.tokens(plan.training.fp8_format) + F.FP8_RECIPE.tokens(plan.training.fp8_recipe)
        # validate_args: only with the distributed optimizer or FSDP (priced likewise).
        args += F.FP8_PARAM_GATHER.tokens() if plan.training.fp8_param_gather and s.zero and s.shards > 1 else []
    if plan.training.fp4_recipe:
        args += F.FP4_FORMAT.tokens(F.E2M1) + F.FP4_RECIPE.tokens(plan.training.fp4_recipe)
    args += F.GRAD_REDUCE_IN_BF16.tokens() if plan.training.grad_reduce_in_bf16 else []
    # Before Blackwell, TP or CP needs one CUDA connection and Megatron-FSDP more than one (capability.py).
    env = {}
    if fsdp:
        env[CONNECTIONS_ENV] = FSDP_CONNECTIONS
    elif s.tp > 1 or s.cp > 1:
        env[CONNECTIONS_ENV] = TP_CONNECTIONS
    return MegatronLaunch(args=args, env=env)


def model_args(model: ModelSpec, training: TrainingSpec) -> list[str]:
    """Megatron model-shape arguments for a decoder-only ModelSpec (for `uniap-megatron args --with-model`)."""
    if model.architecture != "decoder":
        raise SpecError(f"Megatron arguments are generated for decoder-only models (got {model.architecture})")
    args = (
        F.NUM_LAYERS.tokens(model.num_layers)
        + F.HIDDEN_SIZE.tokens(model.hidden_size)
        + F.NUM_ATTENTION_HEADS.tokens(model.num_attention_heads)
        + F.FFN_HIDDEN_SIZE.tokens(model.ffn_hidden_size)
        + F.SEQ_LENGTH.tokens(training.seq_length)
        + F.MAX_POSITION_EMBEDDINGS.tokens(model.max_position_embeddings)
        + F.VOCAB_SIZE.tokens(model.vocab_size)
    )
    if model.num_query_groups and model.num_query_groups != model.num_attention_heads:
        args += F.GROUP_QUERY_ATTENTION.tokens() + F.NUM_QUERY_GROUPS.tokens(model.num_query_groups)
    if model.kv_channels:
        args += F.KV_CHANNELS.tokens(model.kv_channels)
    if model.gated_mlp:
        args += F.SWIGLU.tokens()
    if not model.tied_embeddings:
        args += F.UNTIE_EMBEDDINGS.tokens()
    if model.normalization == "rmsnorm":
        args += F.NORMALIZATION.tokens(F.RMSNORM)
    if model.position_embedding == "rope":
        args += F.POSITION_EMBEDDING.tokens(F.ROPE)
    if not model.add_bias:
        args += F.DISABLE_BIAS_LINEAR.tokens()
    if training.optimizer != F.OPTIMIZER.default:
        args += F.OPTIMIZER.tokens(training.optimizer)
    if training.precision_aware_optimizer:
        args += F.PRECISION_AWARE_OPTIMIZER.tokens()
        for flag, value in (
            (F.MAIN_GRADS_DTYPE, training.main_grads_dtype),
            (F.MAIN_PARAMS_DTYPE, training.main_params_dtype),
            (F.EXP_AVG_DTYPE, training.exp_avg_dtype),
            (F.EXP_AVG_SQ_DTYPE, training.exp_avg_sq_dtype),
        ):
            args += flag.tokens(value) if value != flag.default else []
    return args


# --- Megatron command line -> planning inputs -----------------------------------------------------


@dataclass(frozen=True)
class ParsedJob:
    """What a Megatron command line asks for: the model, the job (overlaps left to the planner) and the pinned
    parallel settings; `overlaps`: the ones the command line itself turns on (to price it as it is)."""

    model: ModelSpec
    training: TrainingSpec
    pins: Pins
    overlaps: tuple[str, ...] = ()


def job_from_args(argv: list[str], name: str = "megatron-model") -> ParsedJob:
    """Model spec, training spec and pins (the parallel flags the user set) from Megatron arguments."""
    try:
        ns, unknown = F.read_parser().parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise SpecError(f"invalid Megatron argument: {exc}") from None
    F.check_no_abbreviations(unknown)
    given = vars(ns).get  # the plan's flags are absent unless the user passed them
    for flag in (F.NUM_LAYERS, F.HIDDEN_SIZE, F.NUM_ATTENTION_HEADS, F.SEQ_LENGTH):
        if getattr(ns, flag.dest) is None:
            raise SpecError(f"Megatron argument {flag.spelling} is required for planning")
    if given(F.GLOBAL_BATCH_SIZE.dest) is None:
        raise SpecError(
            f"Megatron argument {F.GLOBAL_BATCH_SIZE.spelling} is required for planning",
            "pass the global batch size the job should train with",
        )
    if given(F.BF16.dest) and given(F.FP16.dest):
        raise SpecError("--bf16 and --fp16 are mutually exclusive (Megatron validate_args)")
    check_unplanned(ns)
    vocab = ns.padded_vocab_size or ns.vocab_size
    if vocab is None:
        vocab = 50257
        log.warning(
            "no --vocab-size or --padded-vocab-size: planning with GPT-2's 50257 tokens; pass the "
            "tokenizer's vocabulary size for accurate embedding and LM-head costs"
        )
    gated = ns.swiglu
    ffn = ns.ffn_hidden_size or (int((4 * ns.hidden_size * 2 / 3) / 64) * 64 if gated else 4 * ns.hidden_size)
    model = ModelSpec(
        name=name,
        architecture="decoder",
        num_layers=ns.num_layers,
        hidden_size=ns.hidden_size,
        num_attention_heads=ns.num_attention_heads,
        num_query_groups=ns.num_query_groups if ns.group_query_attention else None,
        kv_channels=ns.kv_channels,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        gated_mlp=gated,
        normalization="rmsnorm" if ns.normalization == F.RMSNORM else "layernorm",
        tied_embeddings=not ns.untie_embeddings_and_output_weights,
        position_embedding="rope" if ns.position_embedding_type == F.ROPE else "learned",
        max_position_embeddings=ns.max_position_embeddings or ns.seq_length,
        add_bias=ns.add_bias_linear,
        dropout=ns.hidden_dropout,
    )
    if ns.use_precision_aware_optimizer and not given(F.DISTRIBUTED_OPTIMIZER.dest):
        # megatron-core 0.16.1 optimizer/optimizer_config.py asserts it; uniap will not choose it silently.
        raise SpecError(
            f"{F.PRECISION_AWARE_OPTIMIZER.spelling} needs {F.DISTRIBUTED_OPTIMIZER.spelling} (Megatron-LM's "
            "OptimizerConfig asserts it)",
            f"add {F.DISTRIBUTED_OPTIMIZER.spelling}, or drop {F.PRECISION_AWARE_OPTIMIZER.spelling}",
        )
    fp8 = given(F.FP8_FORMAT.dest)
    training = TrainingSpec(
        global_batch_size=given(F.GLOBAL_BATCH_SIZE.dest),
        seq_length=ns.seq_length,
        precision="bf16" if given(F.BF16.dest) else "fp16" if given(F.FP16.dest) else "fp32",
        fused_kernels=fused_kernels_available(),
        optimizer=MUON if MUON in ns.optimizer else ns.optimizer,  # dist_muon is Muon, sharded its own way
        precision_aware_optimizer=ns.use_precision_aware_optimizer,
        main_grads_dtype=ns.main_grads_dtype,
        main_params_dtype=ns.main_params_dtype,
        exp_avg_dtype=ns.exp_avg_dtype,
        exp_avg_sq_dtype=ns.exp_avg_sq_dtype,
        fp8_recipe=(given(F.FP8_RECIPE.dest) or F.FP8_RECIPE.default) if fp8 else None,
        fp8_format=fp8 or "hybrid",
        fp8_param_gather=bool(fp8 and given(F.FP8_PARAM_GATHER.dest)),
        fp4_recipe=(given(F.FP4_RECIPE.dest) or F.FP4_RECIPE.default) if given(F.FP4_FORMAT.dest) else None,
        grad_reduce_in_bf16=bool(given(F.GRAD_REDUCE_IN_BF16.dest)) and bool(given(F.BF16.dest)),
    )
    fsdp = given(F.TORCH_FSDP2.dest) or given(F.MEGATRON_FSDP.dest)
    zero = 3 if fsdp else 1 if given(F.DISTRIBUTED_OPTIMIZER.dest) else None
    pins = Pins(
        tp=given(F.TENSOR_PARALLEL.dest),
        cp=given(F.CONTEXT_PARALLEL.dest),
        virtual_stages=given(F.VIRTUAL_STAGES_PER_RANK.dest),
        # Megatron takes no layout beside the virtual-stage flag: the user's flag means an even split.
        even_split=given(F.VIRTUAL_STAGES_PER_RANK.dest) is not None,
        pipeline_degree=given(F.PIPELINE_PARALLEL.dest),
        zero=zero,
        recompute=given(F.RECOMPUTE_GRANULARITY.dest),  # --recompute-activations: 'selective'
        micro_batch_per_replica=given(F.MICRO_BATCH_SIZE.dest),
        offloaded_layers=given(F.CPU_OFFLOADING_LAYERS.dest),
    )
    overlaps = tuple(
        o
        for o, flag in ((TP_COMM_OVERLAP, F.TP_COMM_OVERLAP), (PARAM_GATHER_OVERLAP, F.OVERLAP_PARAM_GATHER))
        if given(flag.dest)
    )
    return ParsedJob(model=model, training=training, pins=pins, overlaps=overlaps)


def check_unplanned(ns: argparse.Namespace) -> None:
    """Refuse, by name, a parallelism the planner does not search yet (expert; layers per virtual stage, for
    which --num-virtual-stages-per-pipeline-rank says the same):
    planning without it would price one configuration while Megatron-LM runs another."""
    for flag in F.UNPLANNED_FLAGS:
        value = getattr(ns, flag.dest)
        if value != flag.default:
            raise SpecError(
                f"{flag.spelling} {value}: uniap does not plan this parallelism yet, so the plan would not be the "
                "configuration Megatron-LM runs",
                f"use {F.VIRTUAL_STAGES_PER_RANK.spelling} (model chunks per pipeline rank), which uniap plans"
                if flag is F.LAYERS_PER_VIRTUAL_STAGE
                else f"drop {flag.spelling} to let uniap plan without it, or set every parallel flag yourself and "
                "launch without --auto-parallel",
            )


def world_size(nnodes: int | None = None, nproc_per_node: int | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node): from the launcher's --nnodes/--nproc-per-node, else WORLD_SIZE and
    LOCAL_WORLD_SIZE (torchrun's), else one node of WORLD_SIZE GPUs."""
    if nnodes and nproc_per_node:
        return nnodes, nproc_per_node
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if world <= 0:
        raise SpecError(
            "cannot tell the world size: no --nnodes/--nproc-per-node and no WORLD_SIZE",
            "launch with torchrun, or pass --nnodes and --nproc-per-node",
        )
    if local and world % local == 0:
        return world // local, local
    return 1, world
