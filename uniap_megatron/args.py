"""Plan <-> Megatron-LM (core_v0.16.1) arguments: a thin translation both ways.

plan -> arguments: parallel sizes, batch sizes, sequence parallelism, distributed optimizer or
Megatron-FSDP, recompute, the pipeline split (even, --decoder-first/last-pipeline-num-layers, or a
full --pipeline-model-parallel-layout), precision; the environment Megatron needs
(CUDA_DEVICE_MAX_CONNECTIONS). arguments -> model spec: what the planner needs from a pretraining
command line. Flag spellings and rules: Megatron-LM core_v0.16.1 megatron/training/arguments.py
(add_megatron_arguments, validate_args).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from uniap.cost.strategy import Pins
from uniap.errors import SpecError
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan

from .capability import MEGATRON
from .environment import fused_kernels_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MegatronLaunch:
    """The parallel arguments of a plan and the environment the ranks need."""

    args: list[str]
    env: dict[str, str]


def pipeline_split_args(counts: list[int]) -> list[str]:
    """Megatron flags for transformer layers per stage: none when even, first/last counts when only the
    ends differ (both > 0, equal middles), otherwise a full layout (embedding first, loss last)."""
    pp = len(counts)
    if pp == 1 or len(set(counts)) == 1:
        return []
    first, middle, last = counts[0], counts[1:-1], counts[-1]
    if first > 0 and last > 0 and len(set(middle)) <= 1 and (not middle or middle[0] > 0):
        flags = []
        if not middle or first != middle[0]:
            flags += ["--decoder-first-pipeline-num-layers", str(first)]
        if not middle or last != middle[0]:
            flags += ["--decoder-last-pipeline-num-layers", str(last)]
        return flags
    stages = [("t*%d" % n) if n else "" for n in counts]
    stages[0] = "E" + ("," + stages[0] if stages[0] else "")
    stages[-1] = (stages[-1] + "," if stages[-1] else "") + "L"
    return ["--pipeline-model-parallel-layout", "|".join(stages)]


def megatron_launch(plan: Plan) -> MegatronLaunch:
    """Arguments for pretrain_gpt.py-style scripts that realize `plan` (raises if Megatron cannot)."""
    problems = MEGATRON.violations([(lp.kind, lp.strategy) for lp in plan.layers], plan.pipeline_degree)
    if problems:
        raise SpecError(f"plan (target '{plan.target}') is not runnable by Megatron-LM: {problems[0]}",
                        "re-plan with --target megatron")
    s = plan.uniform_strategy
    if s is None:
        raise SpecError("plan has no transformer layers for Megatron-LM to run")
    pp = plan.pipeline_degree
    seq = plan.training.seq_length
    if s.tp > 1 and seq % s.tp:
        # The plan is priced with sequence parallelism at TP > 1; Megatron's sequence-parallel scatter
        # asserts that the sequence splits evenly over the TP ranks (megatron/core/tensor_parallel/mappings.py).
        raise SpecError(f"plan has tensor parallelism {s.tp}, which does not divide the sequence length {seq}: "
                        "Megatron-LM's sequence parallelism needs seq_length % TP == 0",
                        f"use a sequence length divisible by {s.tp}, or re-plan with --tp pinned to a divisor "
                        f"of {seq}")
    args = ["--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", str(plan.micro_batch_per_replica),
            "--global-batch-size", str(plan.training.global_batch_size)]
    args += pipeline_split_args(plan.stage_layer_counts())
    if s.tp > 1:
        args.append("--sequence-parallel")
    fsdp = s.zero == 3 and s.dp > 1
    if s.zero == 1 and s.dp > 1:
        args += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    elif fsdp:
        args += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params",
                 "--no-gradient-accumulation-fusion", "--use-distributed-optimizer", "--ckpt-format", "fsdp_dtensor"]
    elif s.dp > 1:
        args.append("--overlap-grad-reduce")
    if s.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif s.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    precision = plan.training.precision
    if precision in ("bf16", "fp16"):
        args.append(f"--{precision}")
    # TP on pre-Blackwell GPUs needs one CUDA connection; Megatron-FSDP needs more than one (it warns).
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if s.tp > 1 and not fsdp else {}
    return MegatronLaunch(args=args, env=env)


def model_args(model: ModelSpec, training: TrainingSpec) -> list[str]:
    """Megatron model-shape arguments for a decoder-only ModelSpec (for `uniap-megatron args --with-model`)."""
    if model.architecture != "decoder":
        raise SpecError(f"Megatron arguments are generated for decoder-only models (got {model.architecture})")
    args = ["--num-layers", str(model.num_layers), "--hidden-size", str(model.hidden_size),
            "--num-attention-heads", str(model.num_attention_heads), "--ffn-hidden-size", str(model.ffn_hidden_size),
            "--seq-length", str(training.seq_length), "--max-position-embeddings", str(model.max_position_embeddings),
            "--vocab-size", str(model.vocab_size)]
    if model.num_query_groups and model.num_query_groups != model.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", str(model.num_query_groups)]
    if model.kv_channels:
        args += ["--kv-channels", str(model.kv_channels)]
    if model.gated_mlp:
        args.append("--swiglu")
    if not model.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if model.normalization == "rmsnorm":
        args += ["--normalization", "RMSNorm"]
    if model.position_embedding == "rope":
        args += ["--position-embedding-type", "rope"]
    if not model.add_bias:
        args.append("--disable-bias-linear")
    return args


# --- Megatron command line -> planning inputs -----------------------------------------------------

def _megatron_parser() -> argparse.ArgumentParser:
    """The Megatron-LM flags uniap reads (spellings and defaults of core_v0.16.1); others are ignored."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    a = p.add_argument
    a("--num-layers", type=int)
    a("--hidden-size", type=int)
    a("--num-attention-heads", type=int)
    a("--group-query-attention", action="store_true")
    a("--num-query-groups", type=int, default=1)
    a("--ffn-hidden-size", type=int)
    a("--kv-channels", type=int)
    a("--seq-length", type=int)
    a("--max-position-embeddings", type=int)
    a("--vocab-size", type=int)
    a("--padded-vocab-size", type=int)
    a("--make-vocab-size-divisible-by", type=int, default=128)
    a("--swiglu", action="store_true")
    a("--untie-embeddings-and-output-weights", action="store_true")
    a("--normalization", default="LayerNorm")
    a("--position-embedding-type", default="learned_absolute")
    a("--disable-bias-linear", action="store_true")
    a("--hidden-dropout", type=float, default=0.1)
    a("--global-batch-size", type=int)
    a("--micro-batch-size", type=int)
    a("--bf16", action="store_true")
    a("--fp16", action="store_true")
    a("--tensor-model-parallel-size", type=int)
    a("--pipeline-model-parallel-size", type=int)
    a("--recompute-granularity", choices=("full", "selective"))
    a("--recompute-activations", action="store_true")
    a("--use-distributed-optimizer", action="store_true")
    a("--use-torch-fsdp2", action="store_true")
    a("--use-megatron-fsdp", action="store_true")
    return p


@dataclass(frozen=True)
class ParsedJob:
    model: ModelSpec
    training: TrainingSpec
    pins: Pins


def job_from_args(argv: list[str], name: str = "megatron-model") -> ParsedJob:
    """Model spec, training spec and pins (the parallel flags the user set) from Megatron arguments."""
    ns, _unknown = _megatron_parser().parse_known_args(argv)
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(ns, flag) is None:
            raise SpecError(f"Megatron argument --{flag.replace('_', '-')} is required for planning")
    if ns.global_batch_size is None:
        raise SpecError("Megatron argument --global-batch-size is required for planning",
                        "pass the global batch size the job should train with")
    if ns.bf16 and ns.fp16:
        raise SpecError("--bf16 and --fp16 are mutually exclusive (Megatron validate_args)")
    vocab = ns.padded_vocab_size or ns.vocab_size
    if vocab is None:
        vocab = 50257
        log.warning("no --vocab-size or --padded-vocab-size: planning with GPT-2's 50257 tokens; pass the "
                    "tokenizer's vocabulary size for accurate embedding and LM-head costs")
    gated = ns.swiglu
    ffn = ns.ffn_hidden_size or (int((4 * ns.hidden_size * 2 / 3) / 64) * 64 if gated else 4 * ns.hidden_size)
    model = ModelSpec(
        name=name, architecture="decoder", num_layers=ns.num_layers, hidden_size=ns.hidden_size,
        num_attention_heads=ns.num_attention_heads,
        num_query_groups=ns.num_query_groups if ns.group_query_attention else None, kv_channels=ns.kv_channels,
        ffn_hidden_size=ffn, vocab_size=vocab, gated_mlp=gated,
        normalization="rmsnorm" if ns.normalization.lower() == "rmsnorm" else "layernorm",
        tied_embeddings=not ns.untie_embeddings_and_output_weights,
        position_embedding="rope" if ns.position_embedding_type == "rope" else "learned",
        max_position_embeddings=ns.max_position_embeddings or ns.seq_length, add_bias=not ns.disable_bias_linear,
        dropout=ns.hidden_dropout)
    training = TrainingSpec(global_batch_size=ns.global_batch_size, seq_length=ns.seq_length,
                            precision="bf16" if ns.bf16 else "fp16" if ns.fp16 else "fp32",
                            fused_kernels=fused_kernels_available())
    recompute = "selective" if ns.recompute_activations else ns.recompute_granularity
    zero = 1 if ns.use_distributed_optimizer and not (ns.use_torch_fsdp2 or ns.use_megatron_fsdp) else \
        3 if (ns.use_torch_fsdp2 or ns.use_megatron_fsdp) else None
    pins = Pins(tp=ns.tensor_model_parallel_size, pipeline_degree=ns.pipeline_model_parallel_size, zero=zero,
                recompute=recompute, micro_batch_per_replica=ns.micro_batch_size)
    return ParsedJob(model=model, training=training, pins=pins)


def world_size(nnodes: int | None = None, nproc_per_node: int | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node): from the launcher's --nnodes/--nproc-per-node, else WORLD_SIZE and
    LOCAL_WORLD_SIZE (torchrun's), else one node of WORLD_SIZE GPUs."""
    if nnodes and nproc_per_node:
        return nnodes, nproc_per_node
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if world <= 0:
        raise SpecError("cannot tell the world size: no --nnodes/--nproc-per-node and no WORLD_SIZE",
                        "launch with torchrun, or pass --nnodes and --nproc-per-node")
    if local and world % local == 0:
        return world // local, local
    return 1, world
