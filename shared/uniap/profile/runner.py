"""What the adapters' profilers share and that needs no framework: process-group environment for a
run without a launcher, the processor's name, the printed summary, and the command-line driver."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EXIT_INVALID_INPUT, SpecError, UniapError
from ..io import check_output_path
from .schema import Profile


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_single_process_env(launcher_vars: tuple[str, ...] = ("RANK", "WORLD_SIZE")) -> None:
    """Without a launcher (none of `launcher_vars` set), set up a 1-process group on localhost."""
    env = os.environ
    if any(k in env for k in launcher_vars):
        return
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    env["RANK"], env["WORLD_SIZE"] = "0", "1"
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("LOCAL_WORLD_SIZE", "1")


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def print_summary(
    prog: str, profile: Profile, report: list[str], output: str, world: int, seconds: float, show_tp: bool
) -> None:
    lines = [
        f"{prog}: {profile.device}, {profile.runtime}, backend {profile.backend}, {world} rank(s), {seconds:.1f} s"
    ]
    for sig, timings in profile.layers.items():
        for t in timings:
            act = f"  act {t.activation_bytes / 2**20:.1f} MiB" if t.activation_bytes is not None else ""
            tp = f"tp {t.tp} " if show_tp else ""
            lines.append(
                f"  {sig}  {tp}mbs {t.micro_batch_size}: fwd {t.forward_ms:.3f} ms  bwd {t.backward_ms:.3f} ms{act}"
            )
    lines += [f"  {r}" for r in report]
    if profile.notes:
        lines.append(f"  notes: {profile.notes}")
    lines.append(f"  profile written to {output}")
    print("\n".join(lines))


def check_common_args(args) -> None:
    """The options every profiler has: an output file it may write, warm-up and repeats, the calibration
    run's size. SpecError names the option."""
    check_output_path(args.output, args.force, option="--output")
    if args.warmup < 0:
        raise SpecError(f"--warmup must be >= 0 (got {args.warmup})")
    if args.repeats < 1:
        raise SpecError(f"--repeats must be >= 1 (got {args.repeats})")
    if args.calibration_layers < 0:
        raise SpecError(f"--calibration-layers must be >= 0 (got {args.calibration_layers})")
    if args.calibration_micro_batches < 1:
        raise SpecError(f"--calibration-micro-batches must be >= 1 (got {args.calibration_micro_batches})")


def run_profiler_cli(
    parser: argparse.ArgumentParser, argv: list[str] | None, prog: str, check: Callable, run: Callable
) -> int:
    """Parse, check the inputs (`check(args)` -> (model, training)), run; user errors are a message and
    an exit code, --help and usage errors argparse's own codes."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(levelname)s: %(message)s"
    )
    try:
        model, training = check(args)
        return run(args, model, training)
    except UniapError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code or EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
