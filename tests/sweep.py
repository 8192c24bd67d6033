"""Sweeps: one check over many instances (the Megatron plan grid, random solver instances). The full suite
runs every instance; the fast command (`-m "not slow and not sweep"`) keeps an evenly spread sample."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

SWEEP = pytest.mark.sweep


def sampled(values: Sequence, keep_every: int, ids: Sequence[str] | None = None) -> list:
    """`values` as pytest params, every `keep_every`-th in the fast sample and the rest marked `sweep`."""
    params = []
    for i, value in enumerate(values):
        args = value if isinstance(value, tuple) else (value,)
        params.append(
            pytest.param(*args, marks=() if i % keep_every == 0 else SWEEP, id=ids[i] if ids is not None else None)
        )
    return params
