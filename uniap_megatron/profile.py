"""`uniap-megatron profile`: measure layer times and collective bandwidths through megatron-core.

Layers: for every distinct transformer-layer signature of the model's graph (the profile key, see
uniap.model.graph), a megatron-core `TransformerLayer` is built from a `TransformerConfig` mirroring
the ModelSpec (hidden, heads, query groups, FFN, SwiGLU for a gated MLP, LayerNorm or RMSNorm, linear
biases, dropout 0) with `get_gpt_layer_local_spec()`, under
`parallel_state.initialize_model_parallel(tp, 1)` for each requested TP degree that divides the world
size, and timed as forward + backward of the output sum for each micro-batch size: the median of
`repeats` iterations after `warmup` (CUDA events on a GPU, perf_counter on the CPU). Embedding and
head layers are not timed (a plan built from the profile says `compute mixed`).

On a GPU the stock spec runs (sequence parallelism when tp > 1, params in the plan's precision). On
the CPU megatron-core's DotProductAttention cannot run (it allocates on torch.cuda.current_device()
and forks the CUDA RNG tracker), so the core attention is replaced by `CpuCoreAttention` (SDPA with
the same interface), parameters are fp32, and tp > 1 runs without sequence parallelism (its
gather/scatter buffers are CUDA-only). CPU timings are for testing the pipeline only.

Collectives (world size >= 2): all_reduce, all_gather, reduce_scatter and all_to_all over the world
through torch.distributed (those the backend supports), plus P2P ping-pong rank 0 <-> 1; bus
bandwidth in the NCCL-tests convention, the best over the message sizes.

Run it single-process (`python -m uniap_megatron.profile ...`) or under torchrun; rank 0 writes the
profile JSON atomically.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from uniap.errors import EXIT_OK, ProfileError, SpecError
from uniap.model.graph import build_graph
from uniap.model.loaders import load_model
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.profile.options import float_list, int_list
from uniap.profile.runner import (default_single_process_env, print_summary, processor_name,
                                 run_profiler_cli)
from uniap.profile.schema import CollectiveBandwidth, LayerTiming, Profile, bus_factor

log = logging.getLogger("uniap.megatron.profile")

CPU_NOTE = "CPU timings: for testing the pipeline, not for planning GPU jobs"
DEFAULT_SIZES_MB_CPU = (1.0, 4.0)
DEFAULT_SIZES_MB_GPU = (16.0, 64.0, 256.0)
WORLD_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
PROG = "uniap-megatron profile"


# ==================================================================================================
# Runtime
# ==================================================================================================


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def init_distributed() -> tuple[int, int, str]:
    """torch.distributed with nccl on a GPU, gloo on the CPU; (rank, world size, backend)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if _cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if _cuda() else "gloo")
    return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())


def _device() -> str:
    import torch
    return f"cuda:{torch.cuda.current_device()}" if _cuda() else "cpu"


def _dtype(precision: str):
    import torch
    if not _cuda():
        return torch.float32
    if precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision in ("bf16", "fp16"):
        return torch.float16
    return torch.float32


def device_description() -> str:
    """The GPU's name, or 'cpu (<processor>)'."""
    if _cuda():
        import torch
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({processor_name()})"


def _sync() -> None:
    if _cuda():
        import torch
        torch.cuda.synchronize()


def _all_ranks_ok(ok: bool) -> bool:
    import torch
    import torch.distributed as dist
    if dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


# ==================================================================================================
# Layers
# ==================================================================================================

def _cpu_core_attention_class():
    """A CPU-safe replacement of megatron-core's DotProductAttention (same constructor and forward
    signature): SDPA, causal for a causal mask type, K/V groups repeated for GQA."""
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class CpuCoreAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
            super().__init__(config=config)
            self.attn_mask_type = attn_mask_type
            self.softmax_scale = softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None, "packed sequences are not supported by CpuCoreAttention"
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            s, b, heads, d = query.shape
            groups = key.shape[2]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            if groups != heads:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
            causal = mask_type == AttnMaskType.causal
            mask = None
            if not causal and attention_mask is not None:
                mask = ~attention_mask  # megatron masks are True where attention is NOT allowed
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                               scale=self.softmax_scale)
            return o.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    return CpuCoreAttention


def transformer_config(model: ModelSpec, training: TrainingSpec, tp: int):
    """A megatron-core TransformerConfig mirroring the ModelSpec at tensor-parallel degree `tp`."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = _cuda()
    dtype = _dtype(training.precision)
    kw: dict[str, Any] = dict(
        num_layers=1, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups, ffn_hidden_size=model.ffn_hidden_size, kv_channels=model.head_dim,
        normalization="RMSNorm" if model.normalization == "rmsnorm" else "LayerNorm",
        add_bias_linear=model.add_bias, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        sequence_parallel=tp > 1 and cuda, use_cpu_initialization=not cuda,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    )
    if model.gated_mlp:
        kw.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    return TransformerConfig(**kw)


def build_transformer_layer(model: ModelSpec, training: TrainingSpec, tp: int):
    """A megatron-core TransformerLayer (local spec; CPU-safe core attention on the CPU)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_layer import TransformerLayer

    config = transformer_config(model, training, tp)
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    attn = spec.submodules.self_attention
    if model.architecture != "decoder":
        attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.no_mask}
    if not _cuda():
        attn.submodules.core_attention = _cpu_core_attention_class()
    layer = TransformerLayer(config=config, submodules=spec.submodules, layer_number=1)
    return layer.to(_device()), config


def _seq_for(model: ModelSpec, training: TrainingSpec) -> int:
    return model.vit_seq_length if model.architecture == "vit" else training.seq_length


def time_layer(layer, config, seq: int, micro_batch_size: int, tp: int, warmup: int, repeats: int) -> LayerTiming:
    """Forward + backward of the output sum: medians over `repeats` iterations after `warmup`."""
    import torch

    cuda = _cuda()
    s_local = seq // tp if config.sequence_parallel else seq
    x = torch.randn(s_local, micro_batch_size, config.hidden_size, device=_device(), dtype=config.params_dtype,
                    requires_grad=True)

    def mark():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(a, b) -> float:
        return float(a.elapsed_time(b)) if cuda else (b - a) * 1e3

    forward, backward, kept = [], [], []
    for i in range(warmup + repeats):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        _sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        t0 = mark()
        out = layer(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        t1 = mark()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        out.float().sum().backward()
        t2 = mark()
        _sync()
        if i >= warmup:
            forward.append(elapsed(t0, t1))
            backward.append(elapsed(t1, t2))
            kept.append(peak - before)
        del out
    activation = float(statistics.median(kept)) if cuda else None
    return LayerTiming(tp=tp, micro_batch_size=micro_batch_size, forward_ms=statistics.median(forward),
                       backward_ms=statistics.median(backward), activation_bytes=activation)


def profile_layers(model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], tp_degrees: list[int],
                   warmup: int, repeats: int, notes: list[str]) -> dict[str, list[LayerTiming]]:
    """Timings per transformer-layer signature for each TP degree dividing the world size (every rank
    times; rank 0's numbers are kept). An out-of-memory micro-batch size skips the larger ones."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    graph = build_graph(model, training)
    first: dict[str, Any] = {}
    for layer in graph.layers:
        if layer.kind == "transformer":
            first.setdefault(layer.signature, layer)
        elif layer.kind == "cross_transformer" and layer.signature not in first:
            log.warning("cross-attention layer %s is not profiled; it stays estimated", layer.signature)
    seq = _seq_for(model, training)
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
        if _cuda() and tp > 1 and seq % tp:
            log.warning("tp=%d does not divide the sequence length %d (sequence parallel); skipped", tp, seq)
            continue
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        try:
            if _cuda():
                tensor_parallel.model_parallel_cuda_manual_seed(1234)
            for signature in first:
                for mbs in sorted(set(micro_batch_sizes)):
                    torch.manual_seed(1234)
                    ok, timing = True, None
                    try:
                        layer, config = build_transformer_layer(model, training, tp)
                        timing = time_layer(layer, config, seq, mbs, tp, warmup, repeats)
                        del layer
                    except torch.OutOfMemoryError:
                        ok = False
                    gc.collect()
                    if _cuda():
                        torch.cuda.empty_cache()
                    if not _all_ranks_ok(ok):
                        log.warning("%s tp=%d: micro-batch size %d ran out of memory; larger ones skipped",
                                    signature, tp, mbs)
                        break
                    out.setdefault(signature, []).append(timing)
                    if dist.get_rank() == 0:
                        log.info("%-60s tp %d mbs %3d  fwd %9.3f ms  bwd %9.3f ms", signature, tp, mbs,
                                 timing.forward_ms, timing.backward_ms)
        finally:
            parallel_state.destroy_model_parallel()
    return out


def profile_model(model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], tp_degrees: list[int],
                  warmup: int, repeats: int, device_name: str | None = None) -> Profile:
    """Measure every transformer-layer signature of `model` through megatron-core. Every rank must call
    it after init_distributed; rank 0's numbers are returned."""
    import torch.distributed as dist

    notes: list[str] = []
    layers = profile_layers(model, training, micro_batch_sizes, tp_degrees, warmup, repeats, notes)
    dtype = str(_dtype(training.precision)).replace("torch.", "")
    head = [f"megatron-core TransformerLayer (local spec, {dtype}); median forward/backward ms of {repeats} "
            f"iterations after {warmup} warmup; embedding and head layers not timed"]
    if _cuda():
        head.append("sequence parallel when tp > 1; activation_bytes = peak allocator bytes during forward")
    else:
        head.insert(0, CPU_NOTE)
        head.append("CPU: SDPA core attention, fp32, no sequence parallelism")
    if model.position_embedding == "rope":
        head.append("RoPE not applied")
    return Profile(device=device_name or device_description(), runtime=f"megatron-core {_mcore_version()}",
                   layers=layers, backend=str(dist.get_backend()), notes="; ".join(head + notes))


def _mcore_version() -> str:
    try:
        from importlib.metadata import version
        return version("megatron-core")
    except Exception:  # pragma: no cover
        import megatron.core
        return getattr(megatron.core, "__version__", "unknown")


# ==================================================================================================
# Collectives (plain torch.distributed)
# ==================================================================================================


def _max_over_ranks(seconds: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64 if not _cuda() else torch.float32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _collective_call(op: str, nbytes: int, n: int, dtype) -> Callable[[], None]:
    import torch
    import torch.distributed as dist

    elem = torch.tensor([], dtype=dtype).element_size()
    numel = max(n, nbytes // elem // n * n)
    full = torch.ones(numel, dtype=dtype, device=_device())
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full)
    shard = torch.ones(numel // n, dtype=dtype, device=_device())
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, shard)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(shard, full)
    raise ValueError(op)


def _supported(op: str, n: int, dtype) -> bool:
    ok = True
    try:
        _collective_call(op, 64 * n, n, dtype)()
        _sync()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        log.warning("%s is not supported by this backend (%s); not measured", op, str(exc).splitlines()[0])
        ok = False
    return _all_ranks_ok(ok)


def profile_collectives(sizes_mb: list[float], warmup: int, repeats: int, precision: str = "bf16",
                        report: list[str] | None = None) -> list[CollectiveBandwidth]:
    """Bus bandwidths over the world (scope intra_node on one node, else inter_node) and P2P rank 0 <-> 1."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        return []
    report = report if report is not None else []
    dtype = _dtype(precision)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    scope = "intra_node" if local >= world else "inter_node"
    sizes = [max(1, int(round(s * 2 ** 20))) for s in sizes_mb]
    out: list[CollectiveBandwidth] = []
    for op in WORLD_OPS:
        if not _supported(op, world, dtype):
            continue
        best = 0.0
        for nbytes in sizes:
            call = _collective_call(op, nbytes, world, dtype)
            for _ in range(warmup):
                call()
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(repeats):
                call()
            _sync()
            seconds = _max_over_ranks((time.perf_counter() - t0) / repeats)
            busbw = nbytes / seconds * bus_factor(op, world) / 1e9
            report.append(f"{op:15s} {scope:10s} n={world:<4d} {nbytes / 2**20:9.2f} MiB {seconds * 1e3:10.3f} ms "
                          f"busbw {busbw:9.3f} GB/s")
            best = max(best, busbw)
        if best > 0 and math.isfinite(best):
            out.append(CollectiveBandwidth(op=op, group_size=world, scope=scope, bus_bandwidth_gbps=best))
    # P2P ping-pong rank 0 <-> 1: one-way time = round trip / 2
    p2p_scope = "intra_node" if local >= 2 else "inter_node"
    best = 0.0
    elem = torch.tensor([], dtype=dtype).element_size()
    for nbytes in sizes:
        seconds = 0.0
        if rank in (0, 1):
            buf = torch.ones(max(1, nbytes // elem), dtype=dtype, device=_device())
            peer = 1 - rank

            def round_trip():
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)

            for _ in range(warmup):
                round_trip()
            _sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                round_trip()
            _sync()
            seconds = (time.perf_counter() - t0) / repeats / 2
        seconds = _max_over_ranks(seconds)
        busbw = nbytes / seconds / 1e9
        report.append(f"{'p2p':15s} {p2p_scope:10s} 0<->1   {nbytes / 2**20:9.2f} MiB {seconds * 1e3:10.3f} ms "
                      f"busbw {busbw:9.3f} GB/s")
        best = max(best, busbw)
    if best > 0 and math.isfinite(best):
        out.append(CollectiveBandwidth(op="p2p", group_size=2, scope=p2p_scope, bus_bandwidth_gbps=best))
    return out


# ==================================================================================================
# CLI
# ==================================================================================================

def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Measure transformer-layer times (megatron-core) and collective bandwidths "
                               "(torch.distributed); write a uniap profile JSON for `uniap plan --profile`.",
        epilog="single process: python -m uniap_megatron.profile ...; several: torchrun --nproc-per-node N "
               "-m uniap_megatron.profile ... Exit codes: 0 ok, 1 internal error, 2 invalid input.")
    p.add_argument("--model", required=True, help="preset, uniap YAML/JSON spec, or Hugging Face config.json")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--micro-batch-sizes", type=int_list, default=[1, 2], help="comma-separated (default 1,2)")
    p.add_argument("--tp-degrees", type=int_list, default=[1],
                   help="comma-separated tensor-parallel degrees (default 1); those not dividing the world "
                        "size are skipped")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="the plan's precision (part of the layer signature; default bf16). GPUs compute in it; "
                        "the CPU computes in fp32")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed iterations: layers keep the median; collectives average max(repeats, 5) (default 5)")
    p.add_argument("--collective-sizes-mb", type=float_list,
                   help="message sizes in MiB (default 1,4 on CPU, 16,64,256 on GPU)")
    p.add_argument("--no-collectives", action="store_true", help="time layers only")
    p.add_argument("--device-name", help="the profile's device label (default: detected)")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write (refuses to overwrite without --force)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="log every measurement")
    return p


def _check_args(args) -> tuple[ModelSpec, TrainingSpec]:
    out = Path(args.output)
    if out.is_dir():
        raise SpecError(f"--output {out} is a folder", "give a file path such as profile.json")
    if out.exists() and not args.force:
        raise SpecError(f"{out} exists; not overwriting it", "pass --force, or choose another -o path")
    if args.warmup < 0:
        raise SpecError(f"--warmup must be >= 0 (got {args.warmup})")
    if args.repeats < 1:
        raise SpecError(f"--repeats must be >= 1 (got {args.repeats})")
    model = load_model(args.model)
    seq = args.seq_length or (model.vit_seq_length if model.architecture == "vit" else model.max_position_embeddings)
    training = TrainingSpec(global_batch_size=max(args.micro_batch_sizes), seq_length=seq, precision=args.precision)
    build_graph(model, training)  # the rules that involve both specs, before any process group exists
    return model, training


def main_profile(argv: list[str] | None = None, prog: str = PROG) -> int:
    """`uniap-megatron profile ...`: returns the exit code (0 ok, 2 invalid input)."""
    return run_profiler_cli(build_parser(prog), argv, prog, _check_args, _run)


def _run(args, model: ModelSpec, training: TrainingSpec) -> int:
    try:
        import megatron.core  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SpecError(f"the profiler needs torch and megatron-core ({exc})",
                        "pip install 'uniap[megatron]'") from None
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron.*")
    default_single_process_env()
    rank, world, _backend = init_distributed()
    import torch.distributed as dist

    started = time.perf_counter()
    profile = profile_model(model, training, args.micro_batch_sizes, args.tp_degrees, args.warmup, args.repeats,
                            args.device_name)
    report: list[str] = []
    if not args.no_collectives:
        sizes = args.collective_sizes_mb or list(DEFAULT_SIZES_MB_GPU if _cuda() else DEFAULT_SIZES_MB_CPU)
        profile.collectives = profile_collectives(sizes, args.warmup, max(args.repeats, 5), training.precision,
                                                  report)
    if rank == 0:
        try:
            profile.save(args.output)
        except OSError as exc:
            raise ProfileError(f"cannot write profile {args.output}: {exc.strerror or exc}") from None
        print_summary(PROG, profile, report, args.output, world, time.perf_counter() - started, show_tp=True)
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    dist.destroy_process_group()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main_profile(sys.argv[1:], prog="python -m uniap_megatron.profile"))
