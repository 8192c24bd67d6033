"""What the adapters' profilers share and that needs no framework: process-group environment for a
run without a launcher, the printed summary, the command-line driver, and the profiler's
run written once against what each framework's adapter provides (ProfilerAdapter)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_OK, ProfileError, SpecError, UniapError
from ..io import check_output_path
from ..model.loaders import load_model
from ..model.spec import ModelSpec, TrainingSpec, training_spec
from . import collectives
from .harness import RunSchedule, optimizer_line
from .schema import CollectiveBandwidth, Profile

# Calibration iterations at least: they are short, and a median of two is a mean.
CALIBRATION_MIN_ITERATIONS = 3


@dataclass(frozen=True)
class CalibrationSettings:
    """The whole-model run a profiler calibrates against: `layers` transformer layers of the real dimensions,
    trained on `schedule`."""

    layers: int
    schedule: RunSchedule

    @classmethod
    def from_args(cls, args) -> CalibrationSettings:
        """From the options every profiler has (uniap.profile.options.profiler_parser)."""
        schedule = RunSchedule(
            micro_batch_size=min(args.micro_batch_sizes),
            micro_batches=args.calibration_micro_batches,
            warmup=args.warmup,
            iterations=max(args.repeats, CALIBRATION_MIN_ITERATIONS),
        )
        return cls(args.calibration_layers, schedule)


class ProfilerAdapter(Protocol):
    """What a framework's profiler provides; run_profiler does the rest, the same for every framework."""

    prog: str
    show_tp: bool  # whether its layer timings come at several TP degrees

    def start(self, args) -> tuple[int, int]:
        """Set up the process group and the framework's logging; (rank, world size)."""

    def measure(self, args, model: Any, training: Any) -> Profile:
        """The layers and the optimizer step as the framework runs them (every rank; rank 0's numbers)."""

    def collectives(
        self, sizes_mb: list[float] | None, warmup: int, repeats: int, precision: str, report: list[str]
    ) -> list[CollectiveBandwidth]:
        """The collectives' bus bandwidths through the framework's communication module."""

    def calibrate(
        self, profile: Profile, model: Any, training: Any, settings: CalibrationSettings, report: list[str]
    ) -> Profile:
        """`profile` calibrated against one whole-model run (uniap.calibrate.calibrated), its lines in `report`."""

    def finish(self, world: int) -> None:
        """Wait for rank 0's writing, then tear the process group down in order."""


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
    check_output_path(args.output, args.force, option="--output", inputs=[args.model])
    if args.warmup < 0:
        raise SpecError(f"--warmup must be >= 0 (got {args.warmup})")
    if args.repeats < 1:
        raise SpecError(f"--repeats must be >= 1 (got {args.repeats})")
    if args.calibration_layers < 0:
        raise SpecError(f"--calibration-layers must be >= 0 (got {args.calibration_layers})")
    if args.calibration_micro_batches < 1:
        raise SpecError(f"--calibration-micro-batches must be >= 1 (got {args.calibration_micro_batches})")


def profiled_job(args, **fields) -> tuple[ModelSpec, TrainingSpec]:
    """The model and training a profiler measures, from the options every profiler has (checked first):
    batches up to the largest micro-batch size, and the precision and attention kernel asked for."""
    check_common_args(args)
    model = load_model(args.model)
    training = training_spec(
        model,
        max(args.micro_batch_sizes),
        args.seq_length,
        precision=args.precision,
        flash_attention=not args.no_flash_attention,
        **fields,
    )
    return model, training


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


def run_profiler(adapter: ProfilerAdapter, args, model, training) -> int:
    """A profiler's run: the layers and optimizer step, the collectives (before the calibration: its plan
    prices data parallelism with them), the calibration run, and on rank 0 the profile written and summed up."""
    rank, world = adapter.start(args)
    started = time.perf_counter()
    profile = adapter.measure(args, model, training)
    report: list[str] = []
    if not args.no_collectives:
        repeats = max(args.repeats, collectives.COLLECTIVE_MIN_REPEATS)
        profile.collectives = adapter.collectives(
            args.collective_sizes_mb, args.warmup, repeats, training.precision, report
        )
    if profile.optimizer is not None and rank == 0:
        report.append(optimizer_line(profile.optimizer))
    if profile.layers and args.calibration_layers > 0:
        profile = adapter.calibrate(profile, model, training, CalibrationSettings.from_args(args), report)
    if rank == 0:
        try:
            profile.save(args.output)
        except OSError as exc:
            raise ProfileError(f"cannot write profile {args.output}: {exc.strerror or exc}") from None
        print_summary(adapter.prog, profile, report, args.output, world, time.perf_counter() - started, adapter.show_tp)
    adapter.finish(world)
    return EXIT_OK
