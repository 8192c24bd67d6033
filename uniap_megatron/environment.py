"""What the Python environment a Megatron-LM job runs in provides: Transformer Engine, Apex. The plugin and
`uniap-megatron run` plan in that environment, so what is installed is what the job will run with."""

from __future__ import annotations

from functools import cache


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - a broken install raises whatever its import raises
        return False
    return True


@cache
def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch modules import (megatron-core 0.16.1 models/gpt/gpt_layer_specs.py)."""
    return _importable("transformer_engine.pytorch")


@cache
def fused_kernels_available() -> bool:
    """TrainingSpec.fused_kernels: Transformer Engine or Apex is importable, so megatron-core steps with a
    fused Adam (megatron-core 0.16.1 megatron/core/optimizer/__init__.py imports TE's FusedAdam, else
    Apex's, else falls back to torch.optim.AdamW)."""
    return transformer_engine_available() or _importable("apex.optimizers")
