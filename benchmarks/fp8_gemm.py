"""What FP8 GEMMs reach on this GPU, against the efficiency the cost model was fitted to (issue 20's GPU check).

    python benchmarks/fp8_gemm.py [--json out.json]     # needs a CUDA GPU with FP8 (H100, H200, Blackwell)
    python benchmarks/fp8_gemm.py --smoke               # the harness on the CPU, tiny shapes

For each linear GEMM of a transformer layer (QKV, projection, FC1, FC2 of Llama-3-8B and -70B at 8,192 tokens,
each at TP 1, 4 and 8), the forward GEMM in bf16 (torch.matmul) and in FP8 (torch._scaled_mm: E4M3 inputs,
per-tensor scales, bf16 output: what Transformer Engine's tensorwise recipe runs), timed with CUDA events.
Prints TFLOP/s and the fraction of the GPU's dense bf16 and FP8 peaks (its cluster preset's datasheet figures),
beside the fractions uniap prices with (shared/uniap/cluster/devices.py: gemm_forward, gemm_fp8). The fitted
gemm_fp8 covers whole iterations (quantization, scaling and what the model does not separate), so a kernel
alone is expected to run above it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from uniap.cluster.spec import device_cluster
from uniap.model.presets import model_preset

TOKENS = 8192
TENSOR_PARALLEL = (1, 4, 8)
MODELS = ("llama3-8b", "llama3-70b")
WARMUP, REPEATS = 3, 10
SMOKE = (("tiny", 64, 96, 128),)


def gemm_shapes(preset: str, tokens: int, tp: int) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of a layer's forward linear GEMMs on one of `tp` ranks: tokens x in -> out."""
    m = model_preset(preset)
    h, q = m.hidden_size, m.num_attention_heads * m.head_dim
    kv = m.query_groups * m.head_dim
    up = 2 if m.gated_mlp else 1
    return [
        (f"{preset} qkv tp{tp}", tokens, h, (q + 2 * kv) // tp),
        (f"{preset} proj tp{tp}", tokens, q // tp, h),
        (f"{preset} fc1 tp{tp}", tokens, h, up * m.ffn_hidden_size // tp),
        (f"{preset} fc2 tp{tp}", tokens, m.ffn_hidden_size // tp, h),
    ]


def _time(fn, device) -> float:
    """Seconds per call: CUDA events on a GPU, the wall clock elsewhere."""
    import time

    import torch

    for _ in range(WARMUP):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(REPEATS):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / REPEATS
    began = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return (time.perf_counter() - began) / REPEATS


def measure(shapes, device) -> list[dict]:
    import torch

    rows = []
    for name, m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device, dtype=torch.float32)
        bf16 = _time(lambda: torch.matmul(a, b.t()), device)
        fp8 = _time(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
        flops = 2.0 * m * k * n
        rows.append({"gemm": name, "m": m, "k": k, "n": n, "bf16_s": bf16, "fp8_s": fp8, "flops": flops})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the harness runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("fp8_gemm: no CUDA GPU here (--smoke runs the harness on the CPU)")
        return 0
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name() if gpu else "cpu"
    if gpu:
        cluster = device_cluster(name, torch.cuda.get_device_properties(0).total_memory)
        peak, peak8 = cluster.peak_tflops * 1e12, (cluster.peak_fp8_tflops or 0.0) * 1e12
        coefficients = cluster.coefficients
    shapes = [s for preset in MODELS for tp in TENSOR_PARALLEL for s in gemm_shapes(preset, TOKENS, tp)]
    rows = measure(SMOKE if args.smoke else shapes, device)
    print(f"FP8 GEMMs on {name} (torch {torch.__version__}), forward, TFLOP/s and fraction of the dense peak")
    print(f"  {'gemm':<24} {'m':>6} {'k':>6} {'n':>6} {'bf16':>8} {'frac':>6} {'fp8':>8} {'frac':>6}")
    for r in rows:
        t16, t8 = r["flops"] / r["bf16_s"] / 1e12, r["flops"] / r["fp8_s"] / 1e12
        f16 = f"{t16 * 1e12 / peak:.3f}" if gpu else "-"
        f8 = f"{t8 * 1e12 / peak8:.3f}" if gpu and peak8 else "-"
        print(f"  {r['gemm']:<24} {r['m']:>6} {r['k']:>6} {r['n']:>6} {t16:>8.1f} {f16:>6} {t8:>8.1f} {f8:>6}")
    if gpu:
        print(
            f"  uniap prices bf16 GEMMs at {coefficients.gemm_forward:.3f} of the peak and FP8 at "
            f"{coefficients.gemm_fp8:.3f} (fitted to whole iterations: {coefficients.source})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
