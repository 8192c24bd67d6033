"""The adapters' profiler command lines: the options they share and their value types."""

from __future__ import annotations

import argparse
import math

from .collectives import COLLECTIVE_MIN_REPEATS, DEFAULT_SIZES_MB_CPU, DEFAULT_SIZES_MB_GPU

DEFAULT_MICRO_BATCH_SIZES = (1, 2)
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 5
DEFAULT_CALIBRATION_LAYERS = 2
DEFAULT_CALIBRATION_MICRO_BATCHES = 2


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


def profiler_parser(
    prog: str,
    module: str,
    description: str,
    *,
    repeats_use: str,
    unfused_attention: str,
    launcher_note: str = "",
    calibration_note: str = "",
    verbose_note: str = "",
) -> argparse.ArgumentParser:
    """The command line of `module`'s profiler with the options every profiler has (runner.check_common_args
    checks them); the adapter adds its own. The keyword texts say what differs: what keeps the median of
    --repeats, which kernel --no-flash-attention times, and what the launchers, the calibration and -v add."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"{description}; write a uniap profile JSON for `uniap plan --profile`.",
        epilog=f"single process: python -m {module} ...; several: torchrun --nproc-per-node N -m {module} ..."
        f"{launcher_note}; exit codes: 0 ok, 1 internal error, 2 invalid input.",
    )
    p.add_argument("--model", required=True, help="preset, uniap YAML/JSON spec, or Hugging Face config.json")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument(
        "--micro-batch-sizes",
        type=int_list,
        default=list(DEFAULT_MICRO_BATCH_SIZES),
        help=f"comma-separated (default {_csv(DEFAULT_MICRO_BATCH_SIZES)})",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="the plan's precision (part of the layer signature; default bf16). GPUs compute in it; "
        "the CPU computes in fp32",
    )
    p.add_argument(
        "--no-flash-attention",
        action="store_true",
        help=f"time {unfused_attention} instead of flash attention, as `uniap plan --no-flash-attention` plans",
    )
    p.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed iterations first (default {DEFAULT_WARMUP})"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed iterations: {repeats_use}; collectives average max(repeats, "
        f"{COLLECTIVE_MIN_REPEATS}) (default {DEFAULT_REPEATS})",
    )
    p.add_argument(
        "--calibration-layers",
        type=int,
        default=DEFAULT_CALIBRATION_LAYERS,
        help=f"transformer layers of the whole model trained to fit the profile's calibration (default "
        f"{DEFAULT_CALIBRATION_LAYERS}; 0: no calibration run){calibration_note}",
    )
    p.add_argument(
        "--calibration-micro-batches",
        type=int,
        default=DEFAULT_CALIBRATION_MICRO_BATCHES,
        help=f"micro-batches (of the smallest --micro-batch-sizes) per calibration iteration (default "
        f"{DEFAULT_CALIBRATION_MICRO_BATCHES})",
    )
    p.add_argument(
        "--collective-sizes-mb",
        type=float_list,
        help=f"message sizes in MiB (default {_csv(DEFAULT_SIZES_MB_CPU)} on CPU, "
        f"{_csv(DEFAULT_SIZES_MB_GPU)} on GPU); the best bus bandwidth is kept",
    )
    p.add_argument("--no-collectives", action="store_true", help="no collective bandwidths")
    p.add_argument("--device-name", help="the profile's device label (default: detected)")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write (refuses to overwrite without --force)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help=f"log every measurement{verbose_note}")
    return p


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)
