"""The adapters' profiler command lines: the options they share and their value types."""

from __future__ import annotations

import argparse
import math
import textwrap

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_OK, exit_codes_epilog
from .collectives import COLLECTIVE_MIN_REPEATS, DEFAULT_SIZES_MB_CPU, DEFAULT_SIZES_MB_GPU

DEFAULT_MICRO_BATCH_SIZES = (1, 2)
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 5
DEFAULT_CALIBRATION_LAYERS = 2
DEFAULT_CALIBRATION_MICRO_BATCHES = 2
PROFILER_EXIT_CODES = (EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)


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
        description=_fill(f"{description}; write a uniap profile JSON for `uniap plan --profile`."),
        epilog=f"run it in one process: python -m {module} ...\n"
        f"or in several: torchrun --nproc-per-node N -m {module} ...{launcher_note}\n\n"
        f"{exit_codes_epilog(PROFILER_EXIT_CODES)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="model preset, uniap YAML/JSON spec, or Hugging Face config.json (required)"
    )
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument(
        "--micro-batch-sizes",
        type=int_list,
        default=list(DEFAULT_MICRO_BATCH_SIZES),
        help=f"micro-batch sizes to time the layers at, comma-separated (default: {_csv(DEFAULT_MICRO_BATCH_SIZES)})",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="the plan's precision, one of %(choices)s (part of the layer signature; default: %(default)s). "
        "GPUs compute in it; the CPU computes in fp32",
    )
    p.add_argument(
        "--no-flash-attention",
        action="store_true",
        help=f"time {unfused_attention} instead of flash attention, as `uniap plan --no-flash-attention` plans "
        "(default: flash attention)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help="untimed iterations before the timed ones (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed iterations: {repeats_use}; collectives average max(repeats, "
        f"{COLLECTIVE_MIN_REPEATS}) (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-layers",
        type=int,
        default=DEFAULT_CALIBRATION_LAYERS,
        help="transformer layers of the whole model trained to fit the profile's calibration (default: "
        f"%(default)s; 0: no calibration run){calibration_note}",
    )
    p.add_argument(
        "--calibration-micro-batches",
        type=int,
        default=DEFAULT_CALIBRATION_MICRO_BATCHES,
        help="micro-batches (of the smallest --micro-batch-sizes) per calibration iteration (default: %(default)s)",
    )
    p.add_argument(
        "--collective-sizes-mb",
        type=float_list,
        help=f"message sizes in MiB to time the collectives at, comma-separated; the best bus bandwidth is kept "
        f"(default: {_csv(DEFAULT_SIZES_MB_CPU)} on CPU, {_csv(DEFAULT_SIZES_MB_GPU)} on GPU)",
    )
    p.add_argument(
        "--no-collectives",
        action="store_true",
        help="measure no collective bandwidths (default: measure them when there are 2 or more ranks)",
    )
    p.add_argument("--device-name", help="the profile's device label (default: detected)")
    p.add_argument(
        "-o", "--output", required=True, help="profile JSON to write (required; refuses to overwrite without --force)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (default: refuse)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help=f"log every measurement{verbose_note} (default: warnings only)"
    )
    return p


def _fill(text: str) -> str:
    """`text` wrapped for a RawDescriptionHelpFormatter, which keeps line breaks but makes none."""
    return textwrap.fill(text, width=79, break_long_words=False, break_on_hyphens=False)


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)
