"""Command-line value types shared by the adapters' profilers."""
from __future__ import annotations

import argparse
import math


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def float_list(text: str) -> list[float]:
    """'1,4.5' -> [1.0, 4.5]: positive finite numbers (message sizes in MB)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive sizes in MB, got '{text}'")
    return values
