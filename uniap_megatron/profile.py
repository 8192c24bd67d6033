"""`uniap-megatron profile`: measure what a Megatron-LM job runs, through megatron-core, and label it.

Layers: for every distinct layer signature of the model's graph (the profile key, see uniap.model.graph) the
module Megatron-LM builds for it, timed as forward + backward for each micro-batch size under
`parallel_state.initialize_model_parallel(tp, 1)` for each requested TP degree that divides the world size:
the median of `repeats` iterations after `warmup` (CUDA events on a GPU, perf_counter on the CPU), and on a
GPU `activation_bytes`, what the forward leaves allocated for the backward (allocated after it minus before).
- transformer layers: a `TransformerLayer` from a `TransformerConfig` mirroring the ModelSpec (hidden,
  heads, query groups, FFN, SwiGLU for a gated MLP, LayerNorm or RMSNorm, linear biases, dropout 0), RoPE
  applied where the model has it, with the attention kernel the plan assumes (`Kernels`): Transformer
  Engine's spec when TE is importable, else the local spec with an SDPA core attention (flash on a GPU for
  bf16/fp16); megatron-core's unfused DotProductAttention only with `--no-flash-attention`;
- the embedding: `LanguageModelEmbedding`; the LM head: the final norm GPTModel builds, the output
  `ColumnParallelLinear` and `vocab_parallel_cross_entropy`, whose loss is back-propagated. The vocabulary
  is padded to a multiple of 128 x TP as Megatron-LM pads it (--make-vocab-size-divisible-by 128);
- other embeddings and heads (ViT's, BERT's masked-LM head) and cross-attention layers stay estimated.
Parameters are in the plan's precision on a GPU (as Float16Module casts them), fp32 on the CPU.

Optimizer: one step of the Adam megatron-core constructs (TE FusedAdam, else Apex FusedAdam, else
torch.optim.AdamW) over fp32 master parameters shaped like one transformer layer's, after a warm-up
step that creates the moments.

Calibration (world size 1, `--calibration-layers`, uniap_megatron.training_run): a GPTModel of the real
dimensions with a few layers trained the way Megatron-LM trains it, fitted into the profile's Calibration.

On the CPU megatron-core's DotProductAttention cannot run (it allocates on torch.cuda.current_device()
and forks the CUDA RNG tracker): the unfused kernel is SDPA's math backend there. TP > 1 runs without
sequence parallelism on the CPU, and on a GPU whenever the norms refuse it (torch's norms, megatron-core
0.16.1 transformer/torch_norm.py). CPU timings are for testing the pipeline only.

Collectives (world size >= 2): uniap.profile.collectives through torch.distributed: all_reduce,
all_gather, reduce_scatter and all_to_all over the world (those the backend supports), plus P2P
ping-pong rank 0 <-> 1; bus bandwidth in the NCCL-tests convention, the best over the message sizes.

Run it single-process (`python -m uniap_megatron.profile ...`) or under torchrun; rank 0 writes the
profile JSON atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from uniap.errors import SpecError
from uniap.model.graph import EMBEDDING, HEAD, TRANSFORMER, build_graph
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.profile import collectives, harness
from uniap.profile.harness import ACTIVATION_NOTE, CPU_NOTE, layer_line, optimizer_measured, unless_out_of_memory
from uniap.profile.options import int_list, profiler_parser
from uniap.profile.runner import (
    CALIBRATION_MIN_ITERATIONS,
    profiled_job,
    default_single_process_env,
    run_profiler,
    run_profiler_cli,
)
from uniap.profile.schema import CollectiveBandwidth, LayerTiming, OptimizerTiming, Profile

from .environment import fused_kernels_available
from .modules import (
    VOCAB_MULTIPLE,
    Kernels,
    activation_fusion,
    build_embedding,
    build_lm_head,
    build_transformer_layer,
    choose_kernels,
    megatron_adam,
    norm_label,
    normalization_name,
    padded_vocab_size,
    rotary_embedding,
    sequence_parallel_supported,
)
from . import training_run
from .runtime import (
    all_ranks_ok,
    current_device,
    device_description,
    dtype_of,
    free_cached_memory,
    harness_device,
    init_distributed,
    mcore_version,
    on_cuda,
    process_rank,
    seed_all,
)

log = logging.getLogger("uniap.megatron.profile")

PROG = "uniap-megatron profile"


# ==================================================================================================
# Timing
# ==================================================================================================


def time_passes(
    forward: Callable[[], Any], reset: Callable[[], None], warmup: int, repeats: int
) -> tuple[float, float, float | None]:
    """uniap.profile.harness.time_passes on this rank's device: (forward ms, backward ms, activation bytes).
    `forward()` returns a scalar loss, back-propagated as it is, or an output whose gradient is taken as ones;
    `reset()` drops the previous iteration's gradients."""
    import torch

    ones = None

    def backward(out) -> None:
        nonlocal ones
        if out.dim() == 0:
            out.backward()
            return
        if ones is None or ones.shape != out.shape:
            ones = torch.ones_like(out)
        out.backward(ones)

    return harness.time_passes(forward, backward, reset, warmup, repeats, harness_device())


def time_layer(
    layer, config, seq: int, micro_batch_size: int, tp: int, warmup: int, repeats: int, rotary=None
) -> LayerTiming:
    """A TransformerLayer's forward and backward on a random input (its sequence shard under sequence
    parallelism), the gradient of its output all ones."""
    import torch

    s_local = seq // tp if config.sequence_parallel else seq
    x = torch.randn(
        s_local,
        micro_batch_size,
        config.hidden_size,
        device=current_device(),
        dtype=config.params_dtype,
        requires_grad=True,
    )

    def forward():
        out = layer(x, attention_mask=None, rotary_pos_emb=rotary)
        return out[0] if isinstance(out, tuple) else out

    def reset():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    fwd, bwd, act = time_passes(forward, reset, warmup, repeats)
    return LayerTiming(tp=tp, micro_batch_size=micro_batch_size, forward_ms=fwd, backward_ms=bwd, activation_bytes=act)


def time_embedding(
    module, config, vocab: int, seq: int, micro_batch_size: int, tp: int, warmup: int, repeats: int
) -> LayerTiming:
    """LanguageModelEmbedding on random token ids (positions 0..s-1; token type 0 where it has types)."""
    import torch

    device = current_device()
    ids = torch.randint(0, vocab, (micro_batch_size, seq), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch_size, -1)
    types = torch.zeros_like(ids) if module.num_tokentypes > 0 else None
    fwd, bwd, act = time_passes(
        lambda: module(ids, positions, tokentype_ids=types), lambda: module.zero_grad(set_to_none=True), warmup, repeats
    )
    return LayerTiming(tp=tp, micro_batch_size=micro_batch_size, forward_ms=fwd, backward_ms=bwd, activation_bytes=act)


def time_head(
    module, config, vocab: int, seq: int, micro_batch_size: int, tp: int, warmup: int, repeats: int
) -> LayerTiming:
    """The LM head from hidden states (its sequence shard under sequence parallelism) to the loss."""
    import torch

    device = current_device()
    s_local = seq // tp if config.sequence_parallel else seq
    x = torch.randn(
        s_local, micro_batch_size, config.hidden_size, device=device, dtype=config.params_dtype, requires_grad=True
    )
    labels = torch.randint(0, vocab, (seq, micro_batch_size), device=device)

    def reset():
        x.grad = None
        module.zero_grad(set_to_none=True)

    fwd, bwd, act = time_passes(lambda: module(x, labels), reset, warmup, repeats)
    return LayerTiming(tp=tp, micro_batch_size=micro_batch_size, forward_ms=fwd, backward_ms=bwd, activation_bytes=act)


# ==================================================================================================
# Layers
# ==================================================================================================


@dataclass(frozen=True)
class Target:
    """One layer signature to time: its kind ('transformer', 'embedding', 'head') and sequence length."""

    signature: str
    kind: str
    seq: int


def profile_targets(model: ModelSpec, training: TrainingSpec, notes: list[str] | None = None) -> list[Target]:
    """The graph's layer signatures this profiler times (transformer layers, LanguageModelEmbedding-style
    embeddings, the LM head), one per signature; the others stay estimated (logged and added to `notes`
    when it is given)."""
    graph = build_graph(model, training)
    decoder_seq = training.decoder_seq_length or training.seq_length
    seq_of = {
        "decoder_embedding": decoder_seq,
        "lm_head": decoder_seq if model.architecture == "encoder_decoder" else training.seq_length,
    }
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for layer in graph.layers:
        if layer.signature in targets or layer.signature in skipped:
            continue
        if layer.kind == TRANSFORMER:
            seq = model.vit_seq_length if model.architecture == "vit" else training.seq_length
            targets[layer.signature] = Target(layer.signature, TRANSFORMER, seq)
        elif layer.kind == EMBEDDING and layer.signature.startswith("embedding/"):
            targets[layer.signature] = Target(layer.signature, EMBEDDING, seq_of.get(layer.name, training.seq_length))
        elif layer.kind == HEAD and layer.name == "lm_head":
            targets[layer.signature] = Target(layer.signature, HEAD, seq_of["lm_head"])
        else:
            skipped[layer.signature] = layer.name
    if notes is not None and process_rank() == 0:
        for signature, name in skipped.items():
            log.warning("layer %s (%s) is not profiled; it stays estimated", name, signature)
    if skipped and notes is not None:
        notes.append(f"not timed (estimated): {', '.join(sorted(set(skipped.values())))}")
    return list(targets.values())


def _time_target(
    target: Target,
    model: ModelSpec,
    training: TrainingSpec,
    kernels: Kernels,
    tp: int,
    mbs: int,
    warmup: int,
    repeats: int,
    facts: dict[str, str],
) -> LayerTiming:
    vocab = padded_vocab_size(model.vocab_size, tp)
    if target.kind == TRANSFORMER:
        layer, config = build_transformer_layer(model, training, tp, kernels)
        facts.setdefault("norm", norm_label(layer))
        return time_layer(
            layer, config, target.seq, mbs, tp, warmup, repeats, rotary_embedding(model, config, target.seq)
        )
    if target.kind == EMBEDDING:
        module, config = build_embedding(model, training, tp, kernels)
        return time_embedding(module, config, vocab, target.seq, mbs, tp, warmup, repeats)
    module, config = build_lm_head(model, training, tp, kernels)
    return time_head(module, config, vocab, target.seq, mbs, tp, warmup, repeats)


def profile_layers(
    model: ModelSpec,
    training: TrainingSpec,
    micro_batch_sizes: list[int],
    tp_degrees: list[int],
    warmup: int,
    repeats: int,
    notes: list[str],
    kernels: Kernels | None = None,
    facts: dict[str, str] | None = None,
) -> dict[str, list[LayerTiming]]:
    """Timings per layer signature (profile_targets) for each TP degree dividing the world size (every rank
    times; rank 0's numbers are kept). An out-of-memory micro-batch size skips the larger ones. `facts`
    receives what ran ('norm')."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    kernels = kernels or choose_kernels(training.flash_attention)
    facts = facts if facts is not None else {}
    world = dist.get_world_size()
    targets = profile_targets(model, training, notes)
    out: dict[str, list[LayerTiming]] = {}
    for tp in sorted(set(tp_degrees)):
        if world % tp:
            log.warning("tp=%d does not divide the world size %d; skipped", tp, world)
            notes.append(f"tp={tp} skipped (world size {world})")
            continue
        if model.num_attention_heads % tp or model.query_groups % tp or model.ffn_hidden_size % tp:
            log.warning("tp=%d does not divide the heads/query groups/FFN size; skipped", tp)
            notes.append(f"tp={tp} skipped (does not divide heads, query groups or FFN)")
            continue
        sp = tp > 1 and sequence_parallel_supported(model, kernels)
        if sp and any(t.seq % tp for t in targets):
            log.warning("tp=%d does not divide the sequence length (sequence parallel); skipped", tp)
            notes.append(f"tp={tp} skipped (does not divide the sequence length)")
            continue
        if tp > 1 and not sp:
            why = "torch norms refuse it" if on_cuda() else "CPU"
            notes.append(f"tp={tp} without sequence parallelism ({why})")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        try:
            for target in targets:
                for mbs in sorted(set(micro_batch_sizes)):
                    seed_all()
                    measure = partial(_time_target, target, model, training, kernels, tp, mbs, warmup, repeats, facts)
                    timing = unless_out_of_memory(measure, all_ranks_ok, free_cached_memory)
                    if timing is None:
                        log.warning(
                            "%s tp=%d: micro-batch size %d ran out of memory; larger ones skipped",
                            target.signature,
                            tp,
                            mbs,
                        )
                        break
                    out.setdefault(target.signature, []).append(timing)
                    if dist.get_rank() == 0:
                        log.info("%s", layer_line(target.signature, timing))
        finally:
            parallel_state.destroy_model_parallel()
    return out


# ==================================================================================================
# Optimizer
# ==================================================================================================


def time_optimizer_step(shapes: list, warmup: int, repeats: int) -> OptimizerTiming:
    """megatron_adam over fp32 parameters of `shapes` with fp32 gradients, timed by
    uniap.profile.harness.time_steps: the median step of `repeats` after max(warmup, 1) (the first creates the
    moments); on a GPU the most allocated during a step beyond what was allocated before it."""
    import torch

    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=current_device(), dtype=torch.float32) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    optimizer, name = megatron_adam(params)

    def step() -> bool:
        optimizer.step()
        return True

    step_ms, extra = harness.time_steps(step, warmup, repeats, harness_device())
    return OptimizerTiming(
        implementation=name, num_params=sum(p.numel() for p in params), step_ms=step_ms, extra_peak_bytes=extra
    )


def profile_optimizer(
    model: ModelSpec, training: TrainingSpec, warmup: int, repeats: int, kernels: Kernels | None = None
) -> OptimizerTiming | None:
    """One optimizer step over fp32 master parameters shaped like one transformer layer's (TP 1; the
    distributed optimizer's main parameters at DP 1); None (with a warning) when it runs out of memory
    on any rank. Every rank must call it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    def measure() -> OptimizerTiming:
        seed_all()
        layer, _ = build_transformer_layer(model, training, 1, kernels)
        shapes = [tuple(p.shape) for p in layer.parameters()]
        del layer
        free_cached_memory()
        return time_optimizer_step(shapes, warmup, repeats)

    def cleanup() -> None:
        parallel_state.destroy_model_parallel()
        free_cached_memory()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    timing = unless_out_of_memory(measure, all_ranks_ok, cleanup)
    return optimizer_measured(timing, "one transformer layer", log, dist.get_rank() == 0)


# ==================================================================================================
# The profile
# ==================================================================================================


def profile_model(
    model: ModelSpec,
    training: TrainingSpec,
    micro_batch_sizes: list[int],
    tp_degrees: list[int],
    warmup: int,
    repeats: int,
    device_name: str | None = None,
    optimizer: bool = True,
) -> Profile:
    """Measure `model`'s layer signatures through megatron-core and (`optimizer`) one optimizer step. Every
    rank must call it after init_distributed; rank 0's numbers are returned. The notes say which spec,
    attention kernel and norm ran. Add a calibration with uniap_megatron.training_run.calibrate."""
    import torch.distributed as dist

    kernels = choose_kernels(training.flash_attention)
    notes: list[str] = []
    facts: dict[str, str] = {}
    layers = profile_layers(model, training, micro_batch_sizes, tp_degrees, warmup, repeats, notes, kernels, facts)
    opt = profile_optimizer(model, training, warmup, repeats, kernels) if optimizer else None
    dtype = str(dtype_of(training.precision)).replace("torch.", "")
    head = [
        (
            f"megatron-core {mcore_version()} {kernels.spec_label}: attention {kernels.attention}, "
            f"norm {facts.get('norm', normalization_name(model))}, {dtype}; activation fusion "
            f"{'on' if activation_fusion(model) else 'off'}, bias/dropout/softmax/RoPE fusions off"
        ),
        f"median forward/backward ms of {repeats} iterations after {warmup} warmup",
    ]
    timed = {t.kind for t in profile_targets(model, training)}
    if EMBEDDING in timed:
        head.append("embedding: LanguageModelEmbedding")
    if HEAD in timed:
        head.append("head: final norm + ColumnParallelLinear + vocab_parallel_cross_entropy")
    if timed & {EMBEDDING, HEAD}:
        head.append(f"vocabulary padded to a multiple of {VOCAB_MULTIPLE} x tp")
    if on_cuda():
        head.append(f"{ACTIVATION_NOTE}; sequence parallel when tp > 1 and the norms take it")
    else:
        head.insert(0, CPU_NOTE)
        head.append("CPU: fp32, no sequence parallelism, no activation bytes")
    if opt is not None:
        head.append(
            f"optimizer: {opt.implementation} step over the fp32 master parameters of one transformer "
            f"layer ({opt.num_params:,})"
        )
    return Profile(
        device=device_name or device_description(),
        runtime=f"megatron-core {mcore_version()}",
        layers=layers,
        backend=str(dist.get_backend()),
        notes="; ".join(head + notes),
        optimizer=opt,
    )


# ==================================================================================================
# Collectives
# ==================================================================================================


def profile_collectives(
    sizes_mb: list[float] | None, warmup: int, repeats: int, precision: str = "bf16", report: list[str] | None = None
) -> list[CollectiveBandwidth]:
    """uniap.profile.collectives through torch.distributed in the layers' dtype (`sizes_mb` None: its defaults):
    bus bandwidths over the world (scope intra_node on one node, else inter_node) and P2P rank 0 <-> 1."""
    import torch.distributed as dist

    return collectives.profile_collectives(
        dist, harness_device(), dtype_of(precision), sizes_mb, warmup, repeats, report, per_node=False
    )


# ==================================================================================================
# CLI
# ==================================================================================================


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = profiler_parser(
        prog,
        "uniap_megatron.profile",
        "Measure layer times and an optimizer step (megatron-core), collective "
        "bandwidths (torch.distributed) and a calibration against a short whole-model training run",
        repeats_use="layers and the optimizer step keep the median, the calibration run the median of max(repeats, "
        f"{CALIBRATION_MIN_ITERATIONS}) iterations",
        unfused_attention="megatron-core's unfused DotProductAttention",
        calibration_note=". Runs with one process only",
    )
    p.add_argument(
        "--tp-degrees",
        type=int_list,
        default=[1],
        help="tensor-parallel degrees to time the layers at, comma-separated; those not dividing the world size "
        "are skipped (default: 1)",
    )
    return p


def _check_args(args) -> tuple[ModelSpec, TrainingSpec]:
    model, training = profiled_job(args)
    return model, replace(training, fused_kernels=fused_kernels_available())


class MegatronProfiler:
    """uniap.profile.runner.ProfilerAdapter through megatron-core and torch.distributed."""

    prog = PROG
    show_tp = True

    def start(self, args) -> tuple[int, int]:
        logging.getLogger("megatron").setLevel(logging.WARNING)  # -v: uniap's measurements, not megatron's setup
        try:
            import megatron.core  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise SpecError(
                f"the profiler needs torch and megatron-core ({exc})", "pip install 'uniap[megatron]'"
            ) from None
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron.*")
        default_single_process_env()
        rank, world, _backend = init_distributed()
        return rank, world

    def measure(self, args, model: ModelSpec, training: TrainingSpec) -> Profile:
        return profile_model(
            model, training, args.micro_batch_sizes, args.tp_degrees, args.warmup, args.repeats, args.device_name
        )

    collectives = staticmethod(profile_collectives)

    calibrate = staticmethod(training_run.calibrate)

    def finish(self, world: int) -> None:
        import torch.distributed as dist

        if world > 1:
            dist.barrier()  # nobody leaves while rank 0 still writes
        dist.destroy_process_group()


def main_profile(argv: list[str] | None = None, prog: str = PROG) -> int:
    """`uniap-megatron profile ...`: returns the exit code (0 ok, 2 invalid input)."""
    return run_profiler_cli(
        build_parser(prog), argv, prog, _check_args, lambda *a: run_profiler(MegatronProfiler(), *a)
    )


if __name__ == "__main__":
    sys.exit(main_profile(sys.argv[1:], prog="python -m uniap_megatron.profile"))
