"""A plan merged into a user's Megatron-LM command line: the plan's settings parsed back as Megatron parses
them, the user's explicit flags kept, and a contradiction of a pinned value refused.

The user's explicit flags always win: a parallel flag the user passed is a pin the planner respects,
and no plan value replaces it. A plan that contradicts a pin it should have respected (a saved plan
made for another command line) is refused with a message naming both values. Used by the
`--auto-parallel` plugin (which rewrites Megatron's parsed `args` in every rank) and the `uniap-megatron`
CLI (which rewrites the script's argument list once, before launching).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from uniap.errors import SpecError
from uniap.plan import Plan

from . import flags as F
from .args import megatron_launch
from .capability import CONNECTIONS_ENV, FSDP_CONNECTIONS

# A plan value that differs from the user's explicit one: these cannot be reconciled (the plan's
# prediction and feasibility rest on them, or Megatron rejects the mix) -> refused.
MUST_MATCH = tuple(
    f.dest
    for f in (
        F.TENSOR_PARALLEL,
        F.CONTEXT_PARALLEL,
        F.PIPELINE_PARALLEL,
        F.VIRTUAL_STAGES_PER_RANK,
        F.MICRO_BATCH_SIZE,
        F.GLOBAL_BATCH_SIZE,
        F.RECOMPUTE_GRANULARITY,
        F.SHARDING_STRATEGY,
        F.CHECKPOINT_FORMAT,
    )
)
# Megatron-FSDP flags a plan with ZeRO-3 sets; dropped when the user asked for torch FSDP2 instead.
MEGATRON_FSDP_ONLY = tuple(
    f.dest
    for f in (
        F.MEGATRON_FSDP,
        F.SHARDING_STRATEGY,
        F.DISTRIBUTED_OPTIMIZER,
        F.CHECKPOINT_FORMAT,
        F.OVERLAP_PARAM_GATHER,
    )
)
# The plugin's own flags: the value-taking ones, and all of them (dropped from the launched command).
AUTO_PARALLEL_VALUE_FLAGS = (
    "--auto-parallel-cluster",
    "--auto-parallel-profile",
    "--auto-parallel-plan",
    "--auto-parallel-time-limit",
    "--auto-parallel-wait",
)
AUTO_PARALLEL_SWITCHES = ("--auto-parallel", "--auto-parallel-dry-run")


@dataclass(frozen=True)
class Setting:
    """One plan setting: the Megatron `args` attribute, its value and the command-line tokens."""

    dest: str
    value: Any
    tokens: tuple[str, ...]


def plan_settings(launch_args: list[str]) -> list[Setting]:
    """The settings in `megatron_launch(plan).args`, parsed as Megatron parses them."""
    try:
        ns = vars(F.parser(F.PLAN_FLAGS, with_defaults=False).parse_args(launch_args))
    except (argparse.ArgumentError, SystemExit) as exc:  # args.py emitted a flag the table lacks: a bug
        raise RuntimeError(f"uniap_megatron cannot parse the plan's arguments {launch_args}: {exc}") from None
    out, i = [], 0
    while i < len(launch_args):
        flag = F.BY_SPELLING[launch_args[i]]
        n = 2 if flag.takes_value else 1
        out.append(Setting(flag.dest, ns[flag.dest], tuple(launch_args[i : i + n])))
        i += n
    return out


def explicit_settings(argv: list[str]) -> dict[str, Any]:
    """dest -> value of the plan-related flags the user passed explicitly (last one wins, as in argparse)."""
    try:
        ns, _ = F.parser(F.PLAN_FLAGS + F.USER_ALIASES, with_defaults=False).parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise SpecError(f"invalid Megatron argument: {exc}") from None
    return vars(ns)


@dataclass
class Merge:
    """How a plan combines with a command line: the settings to apply (the user did not set them), the
    user's explicit values kept where the plan would differ, and the environment the ranks need."""

    apply: list[Setting]
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # dest -> (user's value, plan's value)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def args(self) -> list[str]:
        return [t for s in self.apply for t in s.tokens]


def merge_plan(plan: Plan, argv: list[str]) -> Merge:
    """Combine `plan` with the user's Megatron arguments `argv`: explicit flags are never overridden;
    an explicit pin the plan contradicts raises SpecError."""
    launch = megatron_launch(plan)
    settings = plan_settings(launch.args)
    user = explicit_settings(argv)
    if user.get(F.TORCH_FSDP2.dest) and plan.pipeline_degree > 1:
        raise SpecError(
            f"--use-torch-fsdp2 requires one pipeline stage; the plan has {plan.pipeline_degree}",
            "re-plan for this command line (without --auto-parallel-plan / --plan)",
        )
    if user.get(F.TORCH_FSDP2.dest) and any(s.dest == "use_megatron_fsdp" for s in settings):
        # The plan shards everything (ZeRO-3); the user chose torch FSDP2 to do it, not Megatron-FSDP.
        settings = [s for s in settings if s.dest not in MEGATRON_FSDP_ONLY]
    merge = Merge(apply=[], env=dict(launch.env))
    if user.get(F.TORCH_FSDP2.dest) or user.get(F.MEGATRON_FSDP.dest):
        # FSDP needs CUDA_DEVICE_MAX_CONNECTIONS != 1 (validate_args); with TP it then only warns.
        merge.env[CONNECTIONS_ENV] = FSDP_CONNECTIONS
    for s in settings:
        if s.dest not in user:
            merge.apply.append(s)
        elif user[s.dest] != s.value:
            if s.dest in MUST_MATCH:
                raise SpecError(
                    f"the plan sets {F.flag_of(s.dest)} {show_value(s.value)} but the command line gives "
                    f"{show_value(user[s.dest])}",
                    "drop the flag to let the plan choose, or re-plan for this command line "
                    "(without --auto-parallel-plan / --plan)",
                )
            merge.kept[s.dest] = (user[s.dest], s.value)
    return merge


def show_value(value: Any) -> str:
    return {True: "(set)", False: "(unset)"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def strip_auto_parallel(argv: list[str]) -> list[str]:
    """`argv` without the plugin's --auto-parallel* flags (and their values)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name in AUTO_PARALLEL_VALUE_FLAGS:
            i += 1 if "=" in tok else 2
            continue
        if tok in AUTO_PARALLEL_SWITCHES:
            i += 1
            continue
        out.append(tok)
        i += 1
    return out


def merged_argv(plan: Plan, argv: list[str]) -> tuple[list[str], Merge]:
    """The script's arguments for launching `plan`: the user's (without --auto-parallel*) followed by
    the plan's settings the user did not set."""
    user = strip_auto_parallel(argv)
    merge = merge_plan(plan, user)
    return user + merge.args, merge
