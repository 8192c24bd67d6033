"""What both converters (`uniap convert megatron`, `uniap convert deepspeed`) share: the configuration before and
after with its table, the options they take alike, the --keep list, and where the converted file goes (beside
the original, never over it)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError, exit_codes_epilog
from .io import check_output_path
from .plan import Plan
from .report import short_label

SUFFIX = ".uniap"  # train.sh -> train.uniap.sh, ds_config.json -> ds_config.uniap.json
DEFAULT_CLUSTER = "dgx-a100-80g"


@dataclass
class Configuration:
    """A configuration and its prediction, for the before/after table."""

    label: str
    plan: Plan
    fits: bool
    memory_bytes: float
    capacity_bytes: float
    notes: list[str] = field(default_factory=list)

    @classmethod
    def planned(cls, plan: Plan) -> Configuration:
        """The plan uniap found (it fits: the search keeps no other)."""
        peak = max(s.memory_bytes for s in plan.stages)
        return cls("planned", plan, True, peak, plan.memory_capacity_bytes)


def _before_after_row(c: Configuration, tokens_per_iteration: float) -> list[str]:
    """One row of the before/after table."""
    plan = c.plan
    return [
        c.label,
        short_label(plan),
        f"{plan.time_per_iteration:.3f}",
        f"{tokens_per_iteration / plan.time_per_iteration:,.0f}",
        f"{plan.mfu * 100:.1f}%",
        f"{c.memory_bytes / 2**30:.1f} / {c.capacity_bytes / 2**30:.1f}" + ("" if c.fits else " (does not fit)"),
    ]


def before_after(
    before: Configuration, after: Configuration, removed: list[str], added: list[str], changed: str = "arguments"
) -> str:
    """The before/after table of a conversion, the speedup, whether the current configuration fits (by how much
    it does not), and what `changed` (the arguments, the config's keys) lost and gained."""
    tokens = before.plan.training.global_batch_size * before.plan.training.seq_length
    header = ["", "configuration", "s/iteration", "tokens/s", "MFU", "peak GiB per GPU / usable"]
    rows = [header, _before_after_row(before, tokens), _before_after_row(after, tokens)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    speedup = before.plan.time_per_iteration / after.plan.time_per_iteration
    basis = after.plan.basis.get("compute", "estimated")
    lines.append(f"  speedup {speedup:.2f}x ({basis} compute; both priced by the same cost model)")
    if not before.fits:
        over = (before.memory_bytes - before.capacity_bytes) / 2**30
        lines.append(f"  the current configuration does not fit: {over:.1f} GiB per GPU over the usable memory")
    for note in before.notes:
        lines.append(f"  note: {note}")
    diff = [*(f"- {r}" for r in removed), *(f"+ {a}" for a in added)]
    lines.append(f"  {changed}: " + ("; ".join(diff) or "unchanged"))
    return "\n".join(lines)


def configuration_summary(c: Configuration) -> dict:
    """A configuration and its prediction for --json."""
    s = c.plan.uniform_strategy
    return {
        "tp": s.tp,
        "cp": s.cp,
        "pp": c.plan.pipeline_degree,
        "dp": c.plan.data_parallel_size,
        "zero": s.zero,
        "offload": s.offload,
        "zeropp": s.zeropp,
        "recompute": s.recompute,
        "micro_batch_size": c.plan.micro_batch_per_replica,
        "micro_batches": c.plan.micro_batches,
        "time_per_iteration_s": c.plan.time_per_iteration,
        "tokens_per_second": c.plan.tokens_per_second,
        "mfu": c.plan.mfu,
        "peak_memory_bytes": c.memory_bytes,
        "usable_memory_bytes": c.capacity_bytes,
        "fits": c.fits,
        "basis": c.plan.basis,
        "notes": c.notes,
    }


def conversion_report(before: Configuration, after: Configuration, **details) -> dict:
    """What `uniap convert ... --json` prints: both configurations, the speed-up, and the adapter's details
    (what changed, where the converted file went)."""
    return {
        "before": configuration_summary(before),
        "after": configuration_summary(after),
        "speedup": before.plan.time_per_iteration / after.plan.time_per_iteration,
        **details,
    }


def conversion_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a `uniap convert <framework>` command, its exit codes in the epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_options(p: argparse.ArgumentParser, keep: tuple[str, ...], what: str) -> None:
    """The options both converters take: hardware, --keep, profile, time limit and output (`what` is converted)."""
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help="the GPUs' preset or file (default: %(default)s)")
    p.add_argument(
        "--keep",
        help=f"choices the plan keeps as they are today, comma-separated from {','.join(keep)} (default: none)",
    )
    p.add_argument("--profile", help="measured profile JSON to price and plan with (default: estimates)")
    p.add_argument("--time-limit", type=float, help="seconds for the search (default: no limit)")
    p.add_argument("-o", "--output", help=f"the converted {what}'s path (default: NAME{SUFFIX}.EXT beside it)")
    p.add_argument("--force", action="store_true", help=f"overwrite an existing converted {what} (never the original)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def keep_choices(text: str | None, choices: tuple[str, ...]) -> set[str]:
    """The --keep list; SpecError naming what is not one of `choices`."""
    keep = {k.strip() for k in text.split(",") if k.strip()} if text else set()
    unknown = keep - set(choices)
    if unknown:
        raise SpecError(f"--keep {','.join(sorted(unknown))}: not a choice", f"choose from {', '.join(choices)}")
    return keep


def converted_path(original: Path) -> Path:
    return original.with_name(original.stem + SUFFIX + original.suffix)


def output_path(
    original: Path, output: str | None, force: bool, what: str, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Where the converted `what` goes: -o, else beside the original; SpecError for the original itself, any
    other file the command reads (`inputs`) or an existing file without --force."""
    out = Path(output) if output else converted_path(original)
    if out.resolve() == original.resolve():
        raise SpecError(f"{out} is the original {what}; uniap never writes over it", "choose another -o")
    check_output_path(str(out), force, inputs=[original, *inputs])
    return out
