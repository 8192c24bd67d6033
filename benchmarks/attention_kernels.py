"""What attention really costs on this GPU, where the cost model assumes: which kernel PyTorch's SDPA picks for
the profilers' attention layouts, and what context parallelism's ring of attention blocks costs against 1/cp of
the unsplit attention.

    python benchmarks/attention_kernels.py [--json out.json]     # needs a CUDA GPU (about 30 s on an H200)
    python benchmarks/attention_kernels.py --smoke               # the harness on the CPU, tiny shapes

Sections:
1. kernels: for each shape (a model preset's heads and head dimension, a micro-batch, a sequence) and each
   q/k/v layout the profilers produce (uniap_deepspeed.layers: a fused QKV projection split and viewed
   [b, heads, s, d]; uniap_megatron's SDPA core attention: [s, b, heads, d] permuted; contiguous copies), the
   backend SDPA's dispatcher picks (torch._fused_sdp_choice), and forward + backward time and peak memory with
   the dispatcher's choice and with each backend forced (a backend that refuses the inputs says why).
   The cost model prices flash attention (no s x s scores kept); a layout that falls back to the math kernel
   keeps the scores and is what a profile of it measures.
2. ring: Megatron's context parallelism (TransformerEngine's load-balanced ring, 2·cp sequence chunks) computes
   on each rank one causal block of L = s/cp tokens and cp - 1 unmasked blocks of L queries against L/2 keys.
   The cost model prices a CP rank's attention as 1/cp of the unsplit causal attention at the same efficiency;
   this prints the measured ratio (the ring's extra time from shorter kernels, communication excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from uniap.model.presets import model_preset

# (preset, micro-batch, sequence): the shapes of the accuracy benchmark's whole jobs.
KERNEL_SHAPES = (("llama2-7b", 1, 4096), ("gpt3-2.7b", 4, 2048), ("gpt3-2.7b", 2, 2048), ("gpt3-13b", 2, 2048))
RING_SHAPES = (("llama2-7b", 1, 8192), ("llama2-7b", 1, 32768))
RING_CP = (2, 4, 8)
SMOKE_KERNEL_SHAPES = (("tiny", 1, 64),)
SMOKE_RING_SHAPES = (("tiny", 1, 64),)
WARMUP, REPEATS = 2, 5
LAYOUTS = ("deepspeed split", "megatron permuted", "contiguous")


def _heads(shape: str) -> tuple[int, int]:
    """(heads, head dimension) of a preset, or a tiny pair."""
    if shape == "tiny":
        return 4, 16
    m = model_preset(shape)
    return m.num_attention_heads, m.head_dim


def _qkv(layout: str, b: int, s: int, heads: int, d: int, device, dtype):
    """q, k, v of shape [b, heads, s, d] (requires grad) with the strides `layout` produces."""
    import torch

    if layout == "deepspeed split":
        fused = torch.randn(b, s, 3 * heads * d, device=device, dtype=dtype, requires_grad=True)
        return tuple(t.view(b, s, heads, d).transpose(1, 2) for t in fused.split(heads * d, dim=-1))
    if layout == "megatron permuted":
        fused = torch.randn(s, b, heads, 3 * d, device=device, dtype=dtype, requires_grad=True)
        return tuple(t.permute(1, 2, 0, 3) for t in fused.split(d, dim=-1))
    return tuple(torch.randn(b, heads, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))


def _time(fn, device) -> tuple[float, int]:
    """Median ms of fn() over REPEATS after WARMUP, and the peak bytes allocated above the start (CUDA)."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(WARMUP):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return sorted(times)[len(times) // 2], peak


def _sdpa_pass(q, k, v, causal: bool, backend=None):
    """Forward + backward of SDPA (backend forced when given)."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.sum().backward()

    return run


def kernels(smoke: bool, device, dtype) -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    names = {int(b.value): n for n, b in backends.items()}
    rows = []
    for shape, b, s in SMOKE_KERNEL_SHAPES if smoke else KERNEL_SHAPES:
        heads, d = _heads(shape)
        for layout in LAYOUTS:
            q, k, v = _qkv(layout, b, s, heads, d, device, dtype)
            choice = names.get(int(torch._fused_sdp_choice(q, k, v, is_causal=True)), "other")
            row = {"shape": shape, "micro_batch": b, "seq": s, "heads": heads, "head_dim": d, "layout": layout}
            row["strides"] = str(q.stride())
            row["chosen"] = choice
            for name, backend in [("default", None), *backends.items()]:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        ms, peak = _time(_sdpa_pass(q, k, v, True, backend), device)
                        row[name] = {"ms": ms, "peak_mib": peak / 2**20}
                    except RuntimeError as exc:
                        why = " | ".join(str(w.message).splitlines()[0] for w in caught) or str(exc).splitlines()[0]
                        row[name] = {"error": why[:300]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def print_kernels(rows: list[dict]) -> None:
    print("1. kernels: SDPA forward + backward, causal; ms and peak MiB above the inputs")
    cols = ("default", "flash", "efficient", "cudnn", "math")
    print(f"  {'shape':<22} {'layout':<18} {'picks':<9} " + " ".join(f"{c:>17}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            cell = r[c]
            cells.append(f"{'refused':>17}" if "error" in cell else f"{cell['ms']:>7.2f} {cell['peak_mib']:>7.0f}M ")
        label = f"{r['shape']} b{r['micro_batch']} s{r['seq']} d{r['head_dim']}"
        print(f"  {label:<22} {r['layout']:<18} {r['chosen']:<9} " + " ".join(cells))
    refusals = {(r["layout"], c): r[c]["error"] for r in rows for c in cols if "error" in r[c]}
    for (layout, c), why in sorted(refusals.items()):
        print(f"  {c} refused ({layout}): {why}")
    print()


def ring(smoke: bool, device, dtype) -> list[dict]:
    rows = []
    for shape, b, s in SMOKE_RING_SHAPES if smoke else RING_SHAPES:
        heads, d = _heads(shape)
        full, _ = _time(_sdpa_pass(*_qkv("contiguous", b, s, heads, d, device, dtype), True), device)
        for cp in RING_CP:
            if s % (2 * cp):
                continue
            length = s // cp
            diagonal, _ = _time(_sdpa_pass(*_qkv("contiguous", b, length, heads, d, device, dtype), True), device)
            q = _qkv("contiguous", b, length, heads, d, device, dtype)[0]
            k, v = _qkv("contiguous", b, length // 2, heads, d, device, dtype)[1:]
            block, _ = _time(_sdpa_pass(q, k, v, False), device)
            ring_ms = diagonal + (cp - 1) * block
            rows.append(
                {
                    "shape": shape,
                    "micro_batch": b,
                    "seq": s,
                    "cp": cp,
                    "unsplit_ms": full,
                    "ring_ms": ring_ms,
                    "ratio": ring_ms / (full / cp),
                }
            )
    return rows


def print_ring(rows: list[dict]) -> None:
    print("2. ring: one CP rank's attention blocks (forward + backward) vs 1/cp of the unsplit causal attention")
    print(f"  {'shape':<22} {'cp':>3} {'unsplit/cp ms':>14} {'ring ms':>9} {'ratio':>7}")
    for r in rows:
        label = f"{r['shape']} b{r['micro_batch']} s{r['seq']}"
        print(f"  {label:<22} {r['cp']:>3} {r['unsplit_ms'] / r['cp']:>14.2f} {r['ring_ms']:>9.2f} {r['ratio']:>7.2f}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: shows the harness runs")
    parser.add_argument("--json", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("attention_kernels: no CUDA GPU here (--smoke runs the harness on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    print(f"{result['device']}, torch {result['torch']}\n")
    result["kernels"] = kernels(args.smoke, device, dtype)
    print_kernels(result["kernels"])
    result["ring"] = ring(args.smoke, device, dtype)
    print_ring(result["ring"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
