"""How fast one GPU model runs a transformer layer's kernels: achieved fractions of its datasheet peaks.

The analytic time of a layer (uniap.cost.model) is
    forward  = GEMM FLOPs / (peak * gemm_forward) + attention FLOPs / (peak * attention)
               + memory traffic / (HBM bandwidth * memory) + layer_overhead_ms
    backward = 2 GEMM FLOPs / (peak * gemm_backward) + 2.5 attention FLOPs / (peak * attention)
               + 2 memory traffic / (HBM bandwidth * memory) + 2 layer_overhead_ms
with attention FLOPs those the kernel executes (a causal flash kernel skips the masked half; its backward
recomputes the scores, hence 2.5). `layer_overhead_ms` is the fixed part of a pass (launch-bound kernels):
why the time per sample falls as the micro-batch grows. Every default below says where it comes from;
a measured profile replaces the layer times, and `uniap calibrate` fits what is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..model.spec import _require

MEASURED, ESTIMATED = "measured", "estimated"


@dataclass(frozen=True)
class DeviceCoefficients:
    """Achieved fractions of peak for one GPU model (dense bf16/fp16 tensor peak, HBM bandwidth)."""

    gemm_forward: float
    gemm_backward: float
    attention: float
    memory: float
    layer_overhead_ms: float
    source: str
    basis: str = ESTIMATED
    # The fraction of the GEMM efficiencies a GEMM keeps when one of its dimensions is not a multiple of 16
    # bytes (cuBLAS leaves its fastest tensor-core kernels): an output projection over an unpadded vocabulary.
    misaligned_gemm: float = 1.0
    # FP8 linear GEMMs: their forward's fraction of the dense FP8 peak (backward at gemm_backward / gemm_forward
    # of it), and the Transformer Engine recipes the GPU runs (TrainingSpec.fp8_recipe).
    gemm_fp8: float = 0.6
    fp8_recipes: tuple[str, ...] = ()
    # The fraction of that FP8 rate an MXFP8 GEMM keeps: its E8M0 scale per 32 values is loaded and applied in
    # the block-scaled MMA, and each operand is quantized row-wise and column-wise with their own blocks.
    mxfp8_gemm: float = 1.0
    # FP4 (NVFP4) linear GEMMs likewise, against the dense FP4 peak.
    gemm_fp4: float = 0.5
    fp4_recipes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "gemm_forward",
            "gemm_backward",
            "attention",
            "memory",
            "misaligned_gemm",
            "gemm_fp8",
            "mxfp8_gemm",
            "gemm_fp4",
        ):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and 0 < v <= 1, name, f"must be in (0, 1] (got {v!r})")
        _require(
            isinstance(self.layer_overhead_ms, (int, float)) and self.layer_overhead_ms >= 0,
            "layer_overhead_ms",
            f"must be >= 0 (got {self.layer_overhead_ms!r})",
        )
        _require(self.basis in (MEASURED, ESTIMATED), "basis", f"must be {MEASURED} or {ESTIMATED}")

    def with_gemm_efficiency(self, efficiency: float) -> DeviceCoefficients:
        """These coefficients with both GEMM efficiencies set by hand (a cluster file's matmul_efficiency)."""
        return replace(
            self,
            gemm_forward=efficiency,
            gemm_backward=efficiency,
            source=f"matmul_efficiency {efficiency:g} set in the cluster spec; {self.source}",
            basis=ESTIMATED,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fitted (least squares on log time) to layers timed with CUDA events on one NVIDIA H200, bf16, torch SDPA
# flash attention, 2026-11-27: a Llama-2-7B layer (h 4096, SwiGLU 11008, seq 4096) as a plain PyTorch module
# and through a DeepSpeed 0.19.8 engine, and a GPT-3-13B-shaped layer (h 5120, GELU 4h, seq 2048), micro-batch
# sizes 1, 2, 4; `memory` fixed at 0.8 (not separable from these points). Residuals: forward -13..+8 %,
# backward -5..+6 % (the two Llama implementations differ by 20 % in forward).
# misaligned_gemm: whole DeepSpeed iterations of a GPT-3-2.7B shape cut to 8 layers (micro-batch 4 x seq 2048,
# bf16, torch 2.11 / CUDA 13.0) with its vocabulary of 50,257 against the same model padded to 50,304: the
# output projection's forward took 18.0 ms more and its backward 22.7 ms more per micro-batch, i.e. 0.13 and
# 0.20 of the aligned efficiencies; 0.17 over both (benchmarks/data/h200-2026-11-27-misaligned-vocab.json).
MISALIGNED_GEMM_H200 = 0.17
# Transformer Engine 2.x recipes by architecture: Hopper runs per-tensor (delayed, current) and block scaling;
# MXFP8 needs Blackwell's block-scaled tensor cores.
HOPPER_FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
_H200 = DeviceCoefficients(
    gemm_forward=0.785,
    gemm_backward=0.76,
    attention=0.22,
    memory=0.8,
    layer_overhead_ms=0.07,
    source="fitted to layer timings measured on one H200 (bf16, SDPA flash attention, 2026-11-27)",
    basis=MEASURED,
    misaligned_gemm=MISALIGNED_GEMM_H200,
    fp8_recipes=HOPPER_FP8_RECIPES,
)

# The H100 SXM is the H200's GH100 chip at the same tensor peak (HBM from the cluster spec): its bf16 GEMM
# efficiencies and per-pass overhead are the H200's. Its FP8 GEMM and attention efficiencies are fitted to
# the fit split of the published real runs (benchmarks/fit_published.py over benchmarks/data/published: 30
# Megatron-Core runs by NVIDIA, NeMo 24.x and Megatron-Bridge 25.09-26.02, FP8 on 8-1,024 H100s, Transformer
# Engine's fused attention; rms log error 0.073). The attention fraction is Transformer Engine's cuDNN kernel in
# whole iterations, above the 0.22 torch's SDPA reached alone on the H200 and below FlashAttention-3's published
# 0.5-0.6 (its kernel-only benchmarks).
_H100 = replace(
    _H200,
    gemm_fp8=0.615,
    attention=0.331,
    source="the H200's bf16 GEMM fit; FP8 GEMM and attention fitted to 30 published H100 runs "
    "(benchmarks/fit_published.py)",
    basis=MEASURED,
)

# Fitted to Galvatron's measured Llama-2-7B layer forward times (hetu-galvatron, bf16, seq 2048, micro-batch
# 1-12; residuals -2.3..+1.9 %), attention efficiency assumed 0.45 (FlashAttention-2's causal forward on an
# A100), backward GEMMs at the H200's backward/forward ratio. The fixed 0.57 ms per layer forward is that
# runtime's; Megatron-LM's own launch overhead was not measured.
_A100 = DeviceCoefficients(
    gemm_forward=0.795,
    gemm_backward=0.77,
    attention=0.45,
    memory=0.8,
    layer_overhead_ms=0.57,
    source="fitted to Galvatron's measured A100 Llama-2-7B layer forward times (seq 2048, micro-batch 1-12); "
    "backward and attention not measured",
    basis=MEASURED,
    misaligned_gemm=MISALIGNED_GEMM_H200,  # the H200's; not measured on an A100
)

# Blackwell (B200, GB200) and Blackwell Ultra (B300, GB300): nothing measured by uniap. bf16 GEMMs at the
# largest GEMMs' published throughput (stas00/ml-engineering compute/accelerator "maximum achievable matmul
# FLOPS": B200 1,745 of 2,250, GB200 1,822 of 2,500), the backward at the H200's backward/forward ratio, the
# per-pass overhead the H200's. FP8, MXFP8 and NVFP4 GEMM and attention efficiencies fitted to the fit split of
# the published runs (benchmarks/fit_published.py): B200/GB200 on 44 Megatron-Bridge 25.09-26.02 and NeMo 25.04
# runs (rms log error 0.058), B300/GB300 on 16 (0.038). The fitted FP8 fraction sits below the 0.72-0.76 of the
# largest FP8 GEMMs: whole iterations spend more of their time outside the GEMMs on these GPUs than the model
# counts. MXFP8 keeps 0.94 of the tensorwise rate on B200/GB200, as the corpus' pairs of otherwise identical
# runs show (0.93-0.98), and 0.97 on B300/GB300. NVFP4 reaches 0.41-0.42 of the FP4 peak,
# not the FP8 fraction: priced at the FP8 fraction, the 18 NVFP4 rows came out 8-22 % too fast.
BLACKWELL_FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
_BLACKWELL = DeviceCoefficients(
    gemm_forward=0.75,
    gemm_backward=0.75 * _H200.gemm_backward / _H200.gemm_forward,
    attention=0.432,
    memory=0.8,
    layer_overhead_ms=_H200.layer_overhead_ms,
    source="bf16 GEMMs from published maximum GEMM throughput; FP8/MXFP8/NVFP4 GEMM and attention fitted to 44 "
    "published B200/GB200 runs (benchmarks/fit_published.py)",
    basis=MEASURED,
    misaligned_gemm=MISALIGNED_GEMM_H200,
    gemm_fp8=0.497,
    mxfp8_gemm=0.94,
    fp8_recipes=BLACKWELL_FP8_RECIPES,
    gemm_fp4=0.407,
    fp4_recipes=("nvfp4",),
)
# Blackwell Ultra doubles the attention's exponentials (SFU) at the same dense bf16/FP8 tensor peaks and has
# 1.5x the FP4 peak.
_BLACKWELL_ULTRA = replace(
    _BLACKWELL,
    attention=0.592,
    gemm_fp8=0.625,
    mxfp8_gemm=0.968,
    gemm_fp4=0.418,
    source="bf16 GEMMs as B200; FP8/MXFP8/NVFP4 GEMM and attention fitted to 16 published B300/GB300 runs "
    "(benchmarks/fit_published.py)",
)

# Any other GPU: the A100/H200 fits' lower GEMM efficiencies, rounded down; nothing measured.
GENERIC_DEVICE = DeviceCoefficients(
    gemm_forward=0.7,
    gemm_backward=0.65,
    attention=0.3,
    memory=0.75,
    layer_overhead_ms=0.3,
    source="generic defaults for an unmeasured GPU (below the A100 and H200 fits); run a profiler or "
    "`uniap calibrate` for this GPU",
    misaligned_gemm=MISALIGNED_GEMM_H200,  # the H200's; not measured on this GPU
    fp8_recipes=("delayed", "tensorwise"),  # per-tensor scaling runs wherever FP8 tensor cores do
)

# Matched as substrings of the GPU's name, in this order (GB200 before B200).
DEVICE_COEFFICIENTS: dict[str, DeviceCoefficients] = {
    "GB300": _BLACKWELL_ULTRA,
    "GB200": _BLACKWELL,
    "B300": _BLACKWELL_ULTRA,
    "B200": _BLACKWELL,
    "H200": _H200,
    "H100": _H100,
    "A100": _A100,
}


def gpu_family(gpu_name: str) -> str | None:
    """The GPU family a device name belongs to ('H100' for 'NVIDIA H100 80GB HBM3'), None for one uniap does not
    know (a CPU, another accelerator)."""
    key = gpu_name.upper()
    return next((family for family in DEVICE_COEFFICIENTS if family in key), None)


def device_coefficients(gpu_name: str) -> DeviceCoefficients:
    """The defaults for a GPU model named like 'NVIDIA H100 80GB HBM3' or 'A100-SXM-80GB'."""
    key = gpu_name.upper()
    for family, coefficients in DEVICE_COEFFICIENTS.items():
        if family in key:
            return coefficients
    return GENERIC_DEVICE
