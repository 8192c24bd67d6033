"""`--auto-parallel` for Megatron-LM (core_v0.16.1) training scripts: plan once, rewrite `args` in every rank.

Usage, in pretrain_gpt.py (two lines; Megatron-LM's `megatron.training` is imported only by install())::

    from uniap_megatron.plugin import auto_parallel_args, chain_providers, install
    install()   # before pretrain(): wraps megatron.training.initialize.validate_args
    ...
    pretrain(..., extra_args_provider=chain_providers(auto_parallel_args,
                                                      add_modelopt_args if has_nvidia_modelopt else None), ...)

then launch as usual with the model arguments and `--auto-parallel`::

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc-per-node 8 pretrain_gpt.py --auto-parallel \\
        --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \\
        --max-position-embeddings 2048 --global-batch-size 256 --bf16 <data, optimizer, ... arguments>

Options (added by `auto_parallel_args`):

- `--auto-parallel`: plan the parallel configuration and set Megatron's arguments from it;
- `--auto-parallel-cluster NAME|FILE` (default dgx-a100-80g; reshaped to the world size), and
  `--auto-parallel-profile FILE` (a measured profile) describe the hardware;
- `--auto-parallel-plan FILE`: use a saved plan (`uniap plan --target megatron -o ...`) as it is;
- `--auto-parallel-time-limit S`: the solver's time limit;
- `--auto-parallel-wait S`: how long ranks other than 0 wait for rank 0's plan (default 1800 s, or
  the time limit + 600 s);
- `--auto-parallel-dry-run`: print the plan and the arguments it sets (rank 0), then exit 0.

What happens, in `validate_args` (the last point before Megatron derives the data-parallel size,
frameworks.md 1.7):

- Parallel flags you pass (`--tensor-model-parallel-size`, `--pipeline-model-parallel-size`,
  `--micro-batch-size`, `--use-distributed-optimizer`, `--use-torch-fsdp2`/`--use-megatron-fsdp`,
  `--recompute-granularity`/`--recompute-activations`, ...) are pins: the plan respects them and no
  plan value replaces any flag you passed. A pin no plan can satisfy fails with the planner's error.
- Rank 0 (env RANK) plans and writes the plan atomically to `$UNIAP_PLAN_DIR` (default: the current
  directory) as `uniap-megatron-plan-<hash>.json`, the hash covering the arguments, the world shape,
  and the contents of the cluster/profile files; the other ranks wait for that file. Every rank then
  applies the same plan; nothing is solved per rank. An existing file with the same hash is reused
  (delete it to re-plan). **Multi-node: the directory must be on a filesystem all nodes share**, or
  pass a saved plan with `--auto-parallel-plan`, or launch with `uniap-megatron run`, which plans
  before launching and passes plain Megatron arguments.
- The plan's arguments are set on `args` (TP/CP/PP sizes, micro/global batch, the pipeline split,
  sequence parallelism, distributed optimizer or Megatron-FSDP, overlap flags, recompute, precision).
- The plan fits the launch's `CUDA_DEVICE_MAX_CONNECTIONS`, which must be set before CUDA starts and which
  Megatron-LM checks before Blackwell GPUs: with `1` (as above) the plan uses no FSDP; unset or another value,
  tensor or context parallelism only under Megatron-FSDP, so the better of a TP-1 CP-1 plan and an FSDP plan
  is chosen. A
  pinned flag the variable rules out is refused naming the variable and the remedies.
  `uniap-megatron run` instead sets the variable as the plan needs.

Errors in the hook print `uniap: error: ...` (no traceback) and exit with uniap's exit codes (2 invalid
input, 3 no plan fits, 4 time limit).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniap import __version__
from uniap import errors as uniap_errors
from uniap.errors import SpecError, UniapError
from uniap.io import is_file_ref, write_json_atomic
from uniap.plan import Plan
from uniap.report import render

from .args import megatron_launch, world_size
from .flags import flag_of
from .merge import (
    AUTO_PARALLEL_SWITCHES,
    AUTO_PARALLEL_VALUE_FLAGS,
    Merge,
    merge_plan,
    show_value,
    strip_auto_parallel,
)
from .capability import CONNECTIONS_ENV, TP_CONNECTIONS, connections_suffice
from .planning import ANY_CONNECTIONS, DEFAULT_CLUSTER, check_plan_fits, plan_megatron

PLAN_DIR_ENV = "UNIAP_PLAN_DIR"
DEFAULT_WAIT = 1800.0
POLL_SECONDS = 0.25
STALE_ERROR_GRACE = 30.0  # an error file older than this process (minus the grace) is from an earlier run

Provider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


# --- the flags -----------------------------------------------------------------------------------


def auto_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: the --auto-parallel argument group."""
    g = parser.add_argument_group(
        "auto-parallel (uniap)",
        "plan TP/PP/DP, ZeRO, recompute and batch split automatically; explicit flags are kept as constraints",
    )
    g.add_argument(
        "--auto-parallel",
        action="store_true",
        help="plan the parallel configuration and set the parallel arguments from the plan",
    )
    g.add_argument(
        "--auto-parallel-cluster",
        default=DEFAULT_CLUSTER,
        help=f"cluster preset or YAML/JSON file (default {DEFAULT_CLUSTER}; shaped to the world size)",
    )
    g.add_argument("--auto-parallel-profile", default=None, help="measured profile JSON (default: analytic estimate)")
    g.add_argument("--auto-parallel-plan", default=None, help="use this saved plan instead of planning")
    g.add_argument("--auto-parallel-time-limit", type=float, default=None, help="solver time limit in seconds")
    g.add_argument(
        "--auto-parallel-wait",
        type=float,
        default=None,
        help=f"seconds ranks other than 0 wait for rank 0's plan (default {DEFAULT_WAIT:g})",
    )
    g.add_argument(
        "--auto-parallel-dry-run",
        action="store_true",
        help="print the plan and the arguments it sets, then exit 0 before training",
    )
    return parser


def chain_providers(*providers: Provider | None) -> Provider:
    """One extra_args_provider that applies each of `providers` in order (None entries are skipped), e.g.
    chain_providers(auto_parallel_args, add_modelopt_args if has_nvidia_modelopt else None)."""
    chosen = [p for p in providers if p is not None]

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in chosen:
            returned = p(parser)
            parser = returned if returned is not None else parser
        return parser

    return provider


# --- the plan, once ------------------------------------------------------------------------------


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        raise SpecError(f"RANK={os.environ['RANK']!r} is not an integer") from None


def _key_argv(argv: list[str]) -> list[str]:
    """The arguments that determine the plan: without per-rank ones (--local-rank) and the plugin's
    switches that do not change it (--auto-parallel-dry-run, --auto-parallel-wait)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name in ("--local-rank", "--local_rank", "--auto-parallel-wait"):
            i += 1 if "=" in tok else 2
            continue
        if tok == "--auto-parallel-dry-run":
            i += 1
            continue
        out.append(tok)
        i += 1
    return out


def _file_digest(ref: str | None) -> str | None:
    if not ref or not is_file_ref(ref) or not Path(ref).is_file():
        return None
    return hashlib.sha256(Path(ref).read_bytes()).hexdigest()


def plan_file_path(args: Any, argv: list[str], nodes: int, gpus_per_node: int) -> Path:
    """Where rank 0 writes the plan for this command line and world shape (same on every rank)."""
    payload = {
        "argv": _key_argv(argv),
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "uniap": __version__,
        "cluster_file": _file_digest(getattr(args, "auto_parallel_cluster", None)),
        "profile_file": _file_digest(getattr(args, "auto_parallel_profile", None)),
        "connections": launch_connections(),  # it limits the plan
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.environ.get(PLAN_DIR_ENV) or ".") / f"uniap-megatron-plan-{digest}.json"


def _error_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".json")] + ".error.json")


def _load_reusable(path: Path, argv: list[str], nodes: int, gpus: int) -> Plan | None:
    try:
        from uniap.planner import load_plan  # the planner (cvxpy) only when a plan is read

        plan = load_plan(path)
        check_plan_fits(plan, argv, nodes, gpus, source=str(path))
        return plan
    except SpecError:
        return None


def _plan_as_rank0(args: Any, argv: list[str], path: Path, nodes: int, gpus: int) -> tuple[Plan, str]:
    err = _error_path(path)
    err.unlink(missing_ok=True)
    if path.exists():
        plan = _load_reusable(path, argv, nodes, gpus)
        if plan is not None:
            return plan, f"reused {path}"
    try:
        plan = plan_megatron(
            argv,
            nodes,
            gpus,
            cluster=args.auto_parallel_cluster,
            profile=args.auto_parallel_profile,
            time_limit=args.auto_parallel_time_limit,
            connections=launch_connections(),
        )
    except UniapError as exc:
        # Tell the waiting ranks why there will be no plan, then fail like they will.
        write_json_atomic(err, {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint})
        raise
    plan.save(path)
    return plan, f"planned on rank 0, written to {path}"


def _wait_for_plan(args: Any, argv: list[str], path: Path, nodes: int, gpus: int, started: float) -> tuple[Plan, str]:
    limit = args.auto_parallel_wait
    if limit is None:
        limit = DEFAULT_WAIT if args.auto_parallel_time_limit is None else args.auto_parallel_time_limit + 600.0
    err = _error_path(path)
    deadline = time.monotonic() + limit
    while True:
        if path.exists():
            plan = _load_reusable(path, argv, nodes, gpus)
            if plan is not None:
                return plan, f"read rank 0's plan from {path}"
        if err.exists() and err.stat().st_mtime >= started - STALE_ERROR_GRACE:
            try:
                data = json.loads(err.read_text())
                message, hint = data["message"], data.get("hint")
            except (OSError, ValueError, KeyError, TypeError):
                data = None  # being replaced; look again
            if data is not None:
                cls = getattr(uniap_errors, str(data.get("error", "")), UniapError)
                cls = cls if isinstance(cls, type) and issubclass(cls, UniapError) else UniapError
                raise cls(f"rank 0 could not plan: {message}", hint)
        if time.monotonic() >= deadline:
            raise SpecError(
                f"rank {_rank()} waited {limit:g} s for rank 0's plan {path.resolve()} and it did not appear",
                f"on several nodes set {PLAN_DIR_ENV} to a directory all nodes share, or pass a saved plan "
                f"with --auto-parallel-plan; raise --auto-parallel-wait if planning takes longer",
            )
        time.sleep(POLL_SECONDS)


def world_shape() -> tuple[int, int]:
    """(nodes, GPUs per node) of this launch: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, or under Slurm
    without torchrun (one task per GPU) SLURM_NTASKS_PER_NODE, else one node of WORLD_SIZE GPUs."""
    if not os.environ.get("LOCAL_WORLD_SIZE"):
        world = os.environ.get("WORLD_SIZE", "")
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
        if world.isdigit() and per_node.isdigit() and int(per_node) > 0 and int(world) % int(per_node) == 0:
            return world_size(int(world) // int(per_node), int(per_node))
    return world_size()


def obtain_plan(args: Any, argv: list[str]) -> tuple[Plan, str]:
    """The plan for this job and where it came from: the saved --auto-parallel-plan, or rank 0's
    (planned once, written to plan_file_path; the other ranks read it)."""
    started = time.time()
    nodes, gpus = world_shape()
    if args.auto_parallel_plan:
        from uniap.planner import load_plan  # the planner (cvxpy) only when a plan is read

        plan = load_plan(args.auto_parallel_plan)
        check_plan_fits(plan, argv, nodes, gpus, source=str(args.auto_parallel_plan))
        return plan, f"loaded {args.auto_parallel_plan}"
    path = plan_file_path(args, argv, nodes, gpus)
    if _rank() == 0:
        return _plan_as_rank0(args, argv, path, nodes, gpus)
    return _wait_for_plan(args, argv, path, nodes, gpus, started)


# --- rewriting args ------------------------------------------------------------------------------


def _blackwell_or_newer() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10)
    except Exception:  # no torch / no CUDA: cannot tell, assume the check applies
        return False


def launch_connections() -> str | None:
    """The CUDA_DEVICE_MAX_CONNECTIONS these ranks run with (None: unset), or ANY_CONNECTIONS on a GPU where
    Megatron-LM has no rule on it (Blackwell and newer)."""
    return ANY_CONNECTIONS if _blackwell_or_newer() else os.environ.get(CONNECTIONS_ENV)


def check_env(merge: Merge, dry_run: bool = False) -> list[str]:
    """Check the launch's CUDA_DEVICE_MAX_CONNECTIONS against what the plan needs (a saved plan was not made
    for it); returns warnings, raises SpecError when Megatron-LM would refuse to run (before Blackwell: TP or
    CP without FSDP needs 1, FSDP anything but 1)."""
    need = merge.env.get(CONNECTIONS_ENV)
    have = os.environ.get(CONNECTIONS_ENV)
    if connections_suffice(need, have) or _blackwell_or_newer():
        return []
    tp = need == TP_CONNECTIONS
    what = "tensor or context parallelism without FSDP" if tp else "Megatron-FSDP"
    rule = f"={TP_CONNECTIONS}" if tp else f" other than {TP_CONNECTIONS}"
    msg = (
        f"the plan uses {what}, which Megatron-LM runs only with {CONNECTIONS_ENV}{rule} on pre-Blackwell GPUs; "
        f"it is {'unset' if have is None else repr(have)} here"
    )
    hint = (
        f"export {CONNECTIONS_ENV}={need} before launching (it must be set before CUDA starts), re-plan under "
        "this environment (without --auto-parallel-plan), or launch with `uniap-megatron run`, which sets it"
    )
    if not dry_run:
        raise SpecError(msg, hint)
    return [f"{msg} (try: {hint})"]


def apply_merge(args: Any, merge: Merge) -> None:
    for s in merge.apply:
        setattr(args, s.dest, s.value)


def describe(plan: Plan, merge: Merge, source: str, warnings: list[str]) -> str:
    lines = [
        render(plan, "uniap auto-parallel plan"),
        "",
        f"  plan: {source}",
        "  Megatron arguments set from the plan: " + (" ".join(merge.args) or "(none)"),
    ]
    if merge.kept:
        lines.append(
            "  kept from the command line (the plan would differ): "
            + ", ".join(f"{flag_of(d)} {show_value(u)} (plan: {show_value(p)})" for d, (u, p) in merge.kept.items())
        )
    if merge.env:
        lines.append("  environment the ranks need: " + " ".join(f"{k}={v}" for k, v in merge.env.items()))
    lines += [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)


def rewrite_args(args: Any, argv: list[str] | None = None) -> Plan | None:
    """With `args.auto_parallel` set: get the plan (saved, or rank 0's) and set the parallel arguments on
    `args` that the command line `argv` (default sys.argv[1:]) did not set explicitly. Returns the plan,
    or None without --auto-parallel. With --auto-parallel-dry-run prints the plan (rank 0) and exits 0.
    Raises UniapError (SpecError, InfeasibleError, SolverTimeLimitError) with the planner's message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "auto_parallel", False):
        given = [
            f
            for f in (*AUTO_PARALLEL_VALUE_FLAGS, *AUTO_PARALLEL_SWITCHES)
            if f != "--auto-parallel" and any(t.split("=", 1)[0] == f for t in argv)
        ]
        if given:
            raise SpecError(f"{given[0]} has no effect without --auto-parallel", "add --auto-parallel")
        return None
    plan, source = obtain_plan(args, argv)
    merge = merge_plan(plan, strip_auto_parallel(argv))
    dry_run = bool(getattr(args, "auto_parallel_dry_run", False))
    warnings = check_env(merge, dry_run=dry_run)
    if dry_run:
        if _rank() == 0:
            print(describe(plan, merge, source, warnings), flush=True)
        raise SystemExit(0)
    apply_merge(args, merge)
    if _rank() == 0:
        print(
            f"uniap: auto-parallel: {source}; setting {' '.join(merge.args) or '(nothing)'}"
            + "".join(f"\nuniap: warning: {w}" for w in warnings),
            flush=True,
        )
    return plan


def install() -> None:
    """Wrap `megatron.training.initialize.validate_args` (imported by name there, so that is the name to
    patch) so rewrite_args runs before Megatron validates; also `megatron.training.arguments.validate_args`
    (what newer Megatron-LM's parse_and_validate_args calls). Idempotent."""
    try:
        from megatron.training import arguments as mt_arguments
        from megatron.training import initialize as mt_initialize
    except ImportError as exc:
        raise ImportError(
            "uniap_megatron.plugin.install() needs Megatron-LM's `megatron.training` package, which is not on PyPI "
            "(megatron-core alone does not have it): run from a Megatron-LM checkout (core_v0.16.1) or put it on "
            f"PYTHONPATH ({exc})"
        ) from exc
    for module in (mt_initialize, mt_arguments):
        original = getattr(module, "validate_args", None)
        if original is None or getattr(original, "_uniap_wrapped", False):
            continue
        module.validate_args = _wrap(original)


_REWRITTEN: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # Namespace is unhashable


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        if _REWRITTEN.get(id(args)) is not args:  # both wrapped names may be called for one args object
            try:
                rewrite_args(args)
            except UniapError as exc:
                print(f"uniap: error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(exc.exit_code) from None
            _REWRITTEN[id(args)] = args
        return original(args, *rest, **kwargs)

    validate_args._uniap_wrapped = True
    return validate_args


__all__ = [
    "auto_parallel_args",
    "chain_providers",
    "install",
    "megatron_launch",
    "obtain_plan",
    "plan_file_path",
    "rewrite_args",
]
