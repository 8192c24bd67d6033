"""`uniap-megatron`: plan a Megatron-LM job and launch it (`run`), print a plan's Megatron arguments
(`args`), or write a launch script for a saved plan (`script`).

  uniap-megatron args plan.json [--with-model]
  uniap-megatron run [--nproc-per-node N] [--nnodes M] [--node-rank R] [--master-addr A] [--master-port P]
                     [--cluster C] [--profile F] [--time-limit S] [--plan plan.json] [--plan-out plan.json]
                     [--dry-run] [--slurm OUT.sbatch [--slurm-mode torchrun-per-node|task-per-gpu]] [--force]
                     -- pretrain_gpt.py --auto-parallel <Megatron arguments>
  uniap-megatron script plan.json --kind single-node|multi-node|slurm|slurm-task-per-gpu [-o FILE]
                     -- pretrain_gpt.py <Megatron arguments>

`run` plans once (the parallel flags in the Megatron arguments are pins), prints the plan and the final
command, and runs torchrun with the script's arguments rewritten: --auto-parallel* dropped, the plan's
parallel flags added where the user gave none (explicit flags are never dropped or replaced), and
CUDA_DEVICE_MAX_CONNECTIONS set as the plan needs (1 for tensor parallelism, 8 for FSDP). Its exit code is
torchrun's. Exit codes otherwise as `uniap` (uniap.errors: 0 ok, 1 bug, 2 invalid input, 3 no plan
fits, 4 time limit, 130 interrupted); each command's --help lists its own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from uniap.cluster.spec import load_cluster
from uniap.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    SpecError,
    exit_codes_epilog,
)
from uniap.entry import adapter_main, add_profile_command
from uniap.io import check_output_paths, write_text_atomic
from uniap.report import render

from .args import megatron_launch, model_args
from .flags import flag_of
from .launch import DEFAULT_MASTER_PORT, LAUNCH_KINDS, launch_script, torchrun_command
from .merge import merged_argv, show_value
from .planning import DEFAULT_CLUSTER, check_plan_fits, plan_megatron
from .plugin import auto_parallel_args

PROG = "uniap-megatron"
SLURM_MODES = {"torchrun-per-node": "slurm", "task-per-gpu": "slurm-task-per-gpu"}
RUN_CODE_NOTE = "Once it launches torchrun, `run` exits with torchrun's exit code."


def _split_command(script_args: list[str]) -> tuple[str, list[str]]:
    if not script_args:
        raise SpecError("no training script given", "append `-- pretrain_gpt.py <Megatron arguments>`")
    script, rest = script_args[0], script_args[1:]
    if script.startswith("-"):
        raise SpecError(
            f"the first word after -- must be the training script, not the option {script!r}",
            "write `-- pretrain_gpt.py <Megatron arguments>`",
        )
    return script, rest


def _launcher() -> list[str]:
    """torchrun beside this Python (the same environment), else on PATH, else `python -m torch.distributed.run`."""
    beside = Path(sys.executable).parent / "torchrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _print_merge(merge) -> None:
    print("  Megatron arguments from the plan: " + (shlex.join(merge.args) or "(none; all given on the command line)"))
    if merge.kept:
        print(
            "  kept from your command line (the plan would differ): "
            + ", ".join(f"{flag_of(d)} {show_value(u)} (plan: {show_value(p)})" for d, (u, p) in merge.kept.items())
        )
    if merge.env:
        print("  environment: " + " ".join(f"{k}={v}" for k, v in merge.env.items()))


# --- args --------------------------------------------------------------------------------------------


def cmd_args(args) -> int:
    from uniap.planner import load_plan  # the planner (cvxpy) only when a plan is read

    plan = load_plan(args.plan)
    launch = megatron_launch(plan)
    words = list(launch.args)
    if args.with_model:
        words = model_args(plan.model, plan.training) + words
    print(shlex.join(words))
    for k, v in launch.env.items():
        print(f"export {k}={shlex.quote(v)}")
    return EXIT_OK


# --- run ---------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    script, margs = _split_command(args.script_args)
    check_output_paths([args.plan_out, args.slurm], args.force)
    # The plugin's own options in the script's arguments serve as defaults for ours.
    own, _ = auto_parallel_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False)).parse_known_args(margs)
    cluster = args.cluster or own.auto_parallel_cluster or DEFAULT_CLUSTER
    profile = args.profile or own.auto_parallel_profile
    time_limit = args.time_limit if args.time_limit is not None else own.auto_parallel_time_limit
    saved = args.plan or own.auto_parallel_plan
    dry_run = args.dry_run or own.auto_parallel_dry_run
    for name in ("nproc_per_node", "nnodes", "master_port"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be a positive integer (got {v})")
    if saved:
        from uniap.planner import load_plan  # the planner (cvxpy) only when a plan is read

        plan = load_plan(saved)
        nnodes = args.nnodes or plan.cluster.num_nodes
        nproc = args.nproc_per_node or plan.cluster.gpus_per_node
        check_plan_fits(plan, margs, nnodes, nproc, source=saved)
    else:
        shape = load_cluster(cluster)
        nnodes = args.nnodes or shape.num_nodes
        nproc = args.nproc_per_node or shape.gpus_per_node
        plan = plan_megatron(
            margs, nnodes, nproc, cluster=cluster, profile=profile, time_limit=time_limit, progress=None
        )
    final, merge = merged_argv(plan, margs)
    command = [script, *final]
    print(render(plan, "uniap-megatron plan"))
    print()
    _print_merge(merge)
    if args.plan_out:
        plan.save(args.plan_out)
        print(f"  plan written to {args.plan_out}")
    if args.slurm:
        text = launch_script(
            SLURM_MODES[args.slurm_mode],
            plan,
            command,
            env=merge.env,
            nnodes=nnodes,
            nproc_per_node=nproc,
            master_port=args.master_port or DEFAULT_MASTER_PORT,
            job_name=args.job_name,
            python=args.python,
        )
        write_text_atomic(Path(args.slurm), text, executable=True)
        print(f"  Slurm script written to {args.slurm} (submit with: sbatch {shlex.quote(args.slurm)})")
        return EXIT_OK
    cmd = torchrun_command(_launcher(), command, nnodes, nproc, args.node_rank, args.master_addr, args.master_port)
    print("command:")
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in merge.env.items()), shlex.join(cmd)]), flush=True)
    if dry_run:
        return EXIT_OK
    if nnodes > 1 and not saved:
        print(
            f"{PROG}: warning: every node plans on its own; with --time-limit the plans may differ. Plan once "
            f"(--plan-out on one node) and pass --plan on every node, or use --slurm",
            file=sys.stderr,
        )
    env = dict(os.environ)
    for k, v in merge.env.items():
        if env.get(k) not in (None, v):
            print(f"{PROG}: note: setting {k}={v} for the plan (it was {env[k]!r})", file=sys.stderr)
        env[k] = v
    try:
        return subprocess.run(cmd, env=env).returncode
    except FileNotFoundError as exc:
        raise SpecError(f"cannot run {cmd[0]}: {exc.strerror}", "install torch (it provides torchrun)") from None


# --- script ------------------------------------------------------------------------------------------


def cmd_script(args) -> int:
    script, margs = _split_command(args.script_args)
    check_output_paths([args.output], args.force, [args.plan, script])
    from uniap.planner import load_plan  # the planner (cvxpy) only when a plan is read

    plan = load_plan(args.plan)
    nnodes, nproc = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    check_plan_fits(plan, margs, nnodes, nproc, source=args.plan)
    final, merge = merged_argv(plan, margs)
    text = launch_script(
        args.kind,
        plan,
        [script, *final],
        env=merge.env,
        master_addr=args.master_addr,
        master_port=args.master_port,
        job_name=args.job_name,
        python=args.python,
    )
    if args.output is not None:
        write_text_atomic(Path(args.output), text, executable=True)
        print(f"wrote {args.output} ({args.kind})")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------------


DESCRIPTION = """\
Plan a Megatron-LM job and launch it with torchrun (`run`), print a saved plan's
Megatron arguments (`args`), write a launch script for a saved plan (`script`),
or profile layers and collectives through megatron-core (`profile`).
`uniap-megatron COMMAND --help` describes each command."""
ARGS_DESCRIPTION = """\
Print a saved plan's Megatron-LM parallelism arguments as one shell-quoted line,
then an `export NAME=value` line for each environment variable the plan needs."""
RUN_DESCRIPTION = """\
Plan once (parallel flags among the Megatron arguments are pins the plan keeps),
print the plan and the final command, and run torchrun with the script's
arguments rewritten: --auto-parallel* dropped, the plan's parallel flags added
where you gave none (yours are never dropped or replaced), and
CUDA_DEVICE_MAX_CONNECTIONS set as the plan needs (1 for tensor parallelism,
8, CUDA's default, for FSDP). The
script and its arguments follow `--`:
  uniap-megatron run --nproc-per-node 8 -- pretrain_gpt.py --auto-parallel ...
The script's --auto-parallel-* options are the defaults of the planning options.
With --slurm it writes a Slurm batch script instead of launching."""
SCRIPT_DESCRIPTION = """\
Write a launch script (torchrun on one node or several, or a Slurm batch script)
that runs the training script with a saved plan's Megatron arguments merged into
its own. The script and its arguments follow `--`:
  uniap-megatron script plan.json -o run.sh -- pretrain_gpt.py <arguments>"""
LOCAL_CODES = (EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)


def _subparser(sub, name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=exit_codes_epilog(note=RUN_CODE_NOTE),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(
        sub,
        "args",
        "print a saved plan's Megatron arguments (one shell-quoted line) and environment",
        ARGS_DESCRIPTION,
        exit_codes_epilog(LOCAL_CODES),
    )
    p.add_argument("plan", help="the saved plan JSON (uniap plan --target megatron -o plan.json)")
    p.add_argument(
        "--with-model",
        action="store_true",
        help="also print the model-shape arguments (default: parallelism arguments only)",
    )

    p = _subparser(
        sub,
        "run",
        "plan, then launch the training script with torchrun (script and arguments after --)",
        RUN_DESCRIPTION,
        exit_codes_epilog(note=RUN_CODE_NOTE),
    )
    g = p.add_argument_group("torchrun")
    g.add_argument("--nproc-per-node", type=int, help="GPUs (processes) per node (default: the cluster's)")
    g.add_argument("--nnodes", type=int, help="number of nodes (default: the cluster's)")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank (default: %(default)s)")
    g.add_argument(
        "--master-addr",
        help="host of node rank 0 (required on several nodes; default on one node: a standalone rendezvous)",
    )
    g.add_argument(
        "--master-port",
        type=int,
        help=f"rendezvous port (default: {DEFAULT_MASTER_PORT} where a rendezvous port is needed)",
    )
    g = p.add_argument_group("planning")
    g.add_argument(
        "--cluster",
        help="cluster preset or YAML/JSON file (default: the script's --auto-parallel-cluster, else "
        f"{DEFAULT_CLUSTER})",
    )
    g.add_argument(
        "--profile",
        help="measured profile JSON (default: the script's --auto-parallel-profile, else analytic estimate)",
    )
    g.add_argument(
        "--time-limit",
        type=float,
        help="solver time limit in seconds (default: the script's --auto-parallel-time-limit, else no limit)",
    )
    g.add_argument(
        "--plan",
        help="use this saved plan JSON instead of planning (default: the script's --auto-parallel-plan, else plan)",
    )
    g.add_argument("--plan-out", help="also write the plan JSON to this file (default: not written)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and the command, do not launch (default: the script's --auto-parallel-dry-run, "
        "else launch)",
    )
    g.add_argument(
        "--slurm",
        metavar="OUT.sbatch",
        help="write a Slurm batch script to this file instead of launching (default: launch with torchrun)",
    )
    g.add_argument(
        "--slurm-mode",
        choices=tuple(SLURM_MODES),
        default="torchrun-per-node",
        help="with --slurm: one task per node running torchrun, or one task per GPU; one of %(choices)s "
        "(default: %(default)s)",
    )
    g.add_argument("--job-name", default=PROG, help="Slurm job name (with --slurm; default: %(default)s)")
    g.add_argument(
        "--python",
        default="python",
        help="Python on the compute nodes (with --slurm-mode task-per-gpu; default: %(default)s)",
    )
    g.add_argument(
        "--force", action="store_true", help="overwrite --plan-out / --slurm files if they exist (default: refuse)"
    )

    p = _subparser(
        sub,
        "script",
        "write a launch script for a saved plan (script and arguments after --)",
        SCRIPT_DESCRIPTION,
        exit_codes_epilog(LOCAL_CODES),
    )
    p.add_argument("plan", help="the saved plan JSON (uniap plan --target megatron -o plan.json)")
    p.add_argument(
        "--kind",
        choices=tuple(LAUNCH_KINDS),
        default="single-node",
        help="what the script runs: torchrun on one node or on each node, or a Slurm batch script (torchrun per "
        "node, or one task per GPU); one of %(choices)s (default: %(default)s)",
    )
    p.add_argument("-o", "--output", help="write the script to this file (default: print it on stdout)")
    p.add_argument("--master-addr", default="localhost", help="host of node rank 0 (multi-node; default: %(default)s)")
    p.add_argument(
        "--master-port", type=int, default=DEFAULT_MASTER_PORT, help="rendezvous port (default: %(default)s)"
    )
    p.add_argument("--job-name", default=PROG, help="Slurm job name (slurm kinds; default: %(default)s)")
    p.add_argument(
        "--python",
        default="python",
        help="Python on the compute nodes (slurm-task-per-gpu; default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (default: refuse)")
    add_profile_command(sub, "layer times (megatron-core) and collective bandwidths")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"args": cmd_args, "run": cmd_run, "script": cmd_script}
    return adapter_main(PROG, argv, build_parser(), commands, "uniap_megatron.profile", no_script_args=("args",))


if __name__ == "__main__":
    sys.exit(main())
