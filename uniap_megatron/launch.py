"""Planning a Megatron-LM job from its command line, merging the plan into that command line, and the
launch scripts (torchrun on one or many nodes, Slurm) that run it.

Shared by the `--auto-parallel` plugin (which rewrites Megatron's parsed `args` in every rank) and
the `uniap-megatron` CLI (which rewrites the script's argument list once, before launching).

The user's explicit flags always win: a parallel flag the user passed is a pin the planner respects,
and no plan value replaces it. A plan that contradicts a pin it should have respected (a saved plan
made for another command line) is refused with a message naming both values.
"""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field, replace
from typing import Any

from uniap.errors import SpecError
from uniap.launch_templates import render
from uniap.plan import Plan
from uniap.report import plural

from .args import ParsedJob, job_from_args, megatron_launch
from .capability import MEGATRON

DEFAULT_CLUSTER = "dgx-a100-80g"
DEFAULT_MASTER_PORT = 29500

# --- the flags a plan sets: flag -> (dest, kind) as Megatron-LM core_v0.16.1 defines them ------------
# kind: int / str take a value; "true" is store_true; "false" is store_false (a `--no-<x>` flag).
PLAN_FLAGS: dict[str, tuple[str, Any]] = {
    "--tensor-model-parallel-size": ("tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("pipeline_model_parallel_size", int),
    "--micro-batch-size": ("micro_batch_size", int),
    "--global-batch-size": ("global_batch_size", int),
    "--decoder-first-pipeline-num-layers": ("decoder_first_pipeline_num_layers", int),
    "--decoder-last-pipeline-num-layers": ("decoder_last_pipeline_num_layers", int),
    "--pipeline-model-parallel-layout": ("pipeline_model_parallel_layout", str),
    "--sequence-parallel": ("sequence_parallel", "true"),
    "--use-distributed-optimizer": ("use_distributed_optimizer", "true"),
    "--overlap-grad-reduce": ("overlap_grad_reduce", "true"),
    "--overlap-param-gather": ("overlap_param_gather", "true"),
    "--use-megatron-fsdp": ("use_megatron_fsdp", "true"),
    "--data-parallel-sharding-strategy": ("data_parallel_sharding_strategy", str),
    "--no-gradient-accumulation-fusion": ("gradient_accumulation_fusion", "false"),
    "--ckpt-format": ("ckpt_format", str),
    "--recompute-granularity": ("recompute_granularity", str),
    "--recompute-method": ("recompute_method", str),
    "--recompute-num-layers": ("recompute_num_layers", int),
    "--bf16": ("bf16", "true"),
    "--fp16": ("fp16", "true"),
}
# Other spellings of the same settings a user may pass (Megatron's own aliases and implications).
USER_ALIASES: dict[str, tuple[str, Any]] = {
    "--recompute-activations": ("recompute_granularity", "selective"),  # validate_args: -> 'selective'
    "--disable-gradient-accumulation-fusion": ("gradient_accumulation_fusion", "false"),
    "--use-torch-fsdp2": ("use_torch_fsdp2", "true"),
}
# A plan value that differs from the user's explicit one: these cannot be reconciled (the plan's
# prediction and feasibility rest on them, or Megatron rejects the mix) -> refused.
MUST_MATCH = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size", "global_batch_size",
              "recompute_granularity", "data_parallel_sharding_strategy", "ckpt_format")
# Megatron-FSDP flags a plan with ZeRO-3 sets; dropped when the user asked for torch FSDP2 instead.
MEGATRON_FSDP_ONLY = ("use_megatron_fsdp", "data_parallel_sharding_strategy", "use_distributed_optimizer",
                      "ckpt_format", "overlap_param_gather")
# The plugin's own flags: the value-taking ones, and all of them (dropped from the launched command).
AUTO_PARALLEL_VALUE_FLAGS = ("--auto-parallel-cluster", "--auto-parallel-profile", "--auto-parallel-plan",
                             "--auto-parallel-time-limit", "--auto-parallel-wait")
AUTO_PARALLEL_SWITCHES = ("--auto-parallel", "--auto-parallel-dry-run")


def _parser(flags: dict[str, tuple[str, Any]]) -> argparse.ArgumentParser:
    """flag -> dest exactly as Megatron maps it (dashes to underscores, store_true/store_false), with
    no defaults, so the namespace holds only what was given."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag, (dest, kind) in flags.items():
        if kind == "true":
            p.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS)
        elif kind == "false":
            p.add_argument(flag, dest=dest, action="store_false", default=argparse.SUPPRESS)
        elif isinstance(kind, str):  # an alias that implies a value
            p.add_argument(flag, dest=dest, action="store_const", const=kind, default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS)
    return p


@dataclass(frozen=True)
class Setting:
    """One plan setting: the Megatron `args` attribute, its value and the command-line tokens."""

    dest: str
    value: Any
    tokens: tuple[str, ...]


def plan_settings(launch_args: list[str]) -> list[Setting]:
    """The settings in `megatron_launch(plan).args`, parsed as Megatron parses them."""
    try:
        ns = vars(_parser(PLAN_FLAGS).parse_args(launch_args))
    except (argparse.ArgumentError, SystemExit) as exc:  # args.py emitted a flag this table lacks: a bug
        raise RuntimeError(f"uniap_megatron.launch cannot parse the plan's arguments {launch_args}: {exc}") from None
    out, i = [], 0
    while i < len(launch_args):
        flag = launch_args[i]
        dest, kind = PLAN_FLAGS[flag]
        n = 1 if kind in ("true", "false") else 2
        out.append(Setting(dest, ns[dest], tuple(launch_args[i:i + n])))
        i += n
    return out


def explicit_settings(argv: list[str]) -> dict[str, Any]:
    """dest -> value of the plan-related flags the user passed explicitly (last one wins, as in argparse)."""
    try:
        ns, _ = _parser({**PLAN_FLAGS, **USER_ALIASES}).parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise SpecError(f"invalid Megatron argument: {exc}") from None
    return vars(ns)


def flag_of(dest: str) -> str:
    return next((f for f, (d, _) in PLAN_FLAGS.items() if d == dest), "--" + dest.replace("_", "-"))


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
    if user.get("use_torch_fsdp2") and plan.pipeline_degree > 1:
        raise SpecError(f"--use-torch-fsdp2 requires one pipeline stage; the plan has {plan.pipeline_degree}",
                        "re-plan for this command line (without --auto-parallel-plan / --plan)")
    if user.get("use_torch_fsdp2") and any(s.dest == "use_megatron_fsdp" for s in settings):
        # The plan shards everything (ZeRO-3); the user chose torch FSDP2 to do it, not Megatron-FSDP.
        settings = [s for s in settings if s.dest not in MEGATRON_FSDP_ONLY]
    merge = Merge(apply=[], env=dict(launch.env))
    if user.get("use_torch_fsdp2") or user.get("use_megatron_fsdp"):
        # FSDP needs CUDA_DEVICE_MAX_CONNECTIONS != 1 (validate_args); with TP it then only warns.
        merge.env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    for s in settings:
        if s.dest not in user:
            merge.apply.append(s)
        elif user[s.dest] != s.value:
            if s.dest in MUST_MATCH:
                raise SpecError(f"the plan sets {flag_of(s.dest)} {show_value(s.value)} but the command line gives "
                                f"{show_value(user[s.dest])}",
                                "drop the flag to let the plan choose, or re-plan for this command line "
                                "(without --auto-parallel-plan / --plan)")
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


# --- planning ----------------------------------------------------------------------------------------

def plan_megatron(argv: list[str], nodes: int, gpus_per_node: int, cluster: str = DEFAULT_CLUSTER,
                  profile: str | None = None, time_limit: float | None = None,
                  progress: bool | None = False) -> Plan:
    """Plan the Megatron job `argv` on `nodes` x `gpus_per_node` GPUs of `cluster`, its explicit parallel
    flags pinned. Raises SpecError / InfeasibleError / SolverTimeLimitError with the planner's message."""
    # The solver (cvxpy, SCIP) is imported only when planning: printing and launching stay fast.
    from uniap.cluster.spec import load_cluster
    from uniap.planner import Job
    from uniap.planner import plan as solve
    from uniap.profile.schema import Profile

    if time_limit is not None and not time_limit > 0:
        raise SpecError(f"the planning time limit must be positive (got {time_limit:g})")
    argv = strip_auto_parallel(argv)
    job = job_from_args(argv)
    if explicit_settings(argv).get("use_torch_fsdp2"):
        # --use-torch-fsdp2 requires one pipeline stage whatever the data-parallel size (validate_args).
        if job.pins.pipeline_degree not in (None, 1):
            raise SpecError(f"--use-torch-fsdp2 requires --pipeline-model-parallel-size 1 (Megatron validate_args); "
                            f"got {job.pins.pipeline_degree}", "drop one of the two flags")
        job = replace(job, pins=replace(job.pins, pipeline_degree=1))
    cl = load_cluster(cluster, nodes, gpus_per_node)
    training = job.training
    check_megatron_pins(job)
    plan, _ = solve(Job(model=job.model, cluster=cl, training=training, target=MEGATRON.name, pins=job.pins,
                        profile=Profile.load(profile) if profile else None, pin_flags=PIN_FLAGS),
                    time_limit=time_limit, progress=progress)
    megatron_launch(plan)  # a plan for target megatron is always runnable; fail here if not
    return plan


# How Megatron-LM spells the pins the core checks (uniap.planner.check_pins names them in its refusals).
PIN_FLAGS = {"tp": "--tensor-model-parallel-size", "pipeline_degree": "--pipeline-model-parallel-size",
             "micro_batch_per_replica": "--micro-batch-size"}


def check_megatron_pins(job: ParsedJob) -> None:
    """Megatron's own limit beyond the core's pin rules: no more pipeline stages than transformer layers."""
    p = job.pins
    if p.pipeline_degree is not None and p.pipeline_degree > job.model.num_layers:
        raise SpecError(f"--pipeline-model-parallel-size {p.pipeline_degree} exceeds --num-layers "
                        f"{job.model.num_layers}", "drop the flag to let the planner choose, or change it")


def check_plan_fits(plan: Plan, argv: list[str], nodes: int, gpus_per_node: int, source: str = "the plan") -> ParsedJob:
    """Refuse a saved plan made for another model, batch, precision or GPU count than this job's."""
    job = job_from_args(strip_auto_parallel(argv))
    planned = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    if planned != nodes * gpus_per_node:
        raise SpecError(f"{source} is for {planned} GPUs ({plan.cluster.num_nodes} x "
                        f"{plan.cluster.gpus_per_node}); this job has {nodes * gpus_per_node} ({nodes} x "
                        f"{gpus_per_node})", "re-plan for this world size")
    wanted = {"num_layers": job.model.num_layers, "hidden_size": job.model.hidden_size,
              "num_attention_heads": job.model.num_attention_heads, "ffn_hidden_size": job.model.ffn_hidden_size}
    have = {k: getattr(plan.model, k) for k in wanted}
    wanted_t = {"global_batch_size": job.training.global_batch_size, "seq_length": job.training.seq_length,
                "precision": job.training.precision}
    have_t = {k: getattr(plan.training, k) for k in wanted_t}
    diffs = [f"{k} {have[k]} (command line: {v})" for k, v in wanted.items() if have[k] != v]
    diffs += [f"{k} {have_t[k]} (command line: {v})" for k, v in wanted_t.items() if have_t[k] != v]
    if diffs:
        raise SpecError(f"{source} was made for another job: " + "; ".join(diffs),
                        "re-plan for this command line")
    return job


# --- launching ---------------------------------------------------------------------------------------

def plan_summary(plan: Plan) -> str:
    """One line (whitespace collapsed, safe in a shell comment) describing the plan."""
    s = plan.uniform_strategy
    c = plan.cluster
    par = f"TP{s.tp} PP{plan.pipeline_degree} DP{s.dp}" if s else f"PP{plan.pipeline_degree}"
    text = (f"{plan.model.name} on {c.num_nodes}x{c.gpus_per_node} {c.gpu_name}: {par}, "
            f"micro-batch size {plan.micro_batch_per_replica} x {plural(plan.micro_batches, 'micro-batch')}, predicted "
            f"{plan.time_per_iteration:.4g} s/iteration ({plan.basis.get('compute', 'estimated')} compute)")
    return " ".join(text.split())


LAUNCH_KINDS = {
    "single-node": "torchrun_single_node.sh.tmpl",
    "multi-node": "torchrun_multi_node.sh.tmpl",
    "slurm": "slurm_torchrun_per_node.sbatch.tmpl",
    "slurm-task-per-gpu": "slurm_task_per_gpu.sbatch.tmpl",
}
ENV_MARKER = "# @uniap-env@\n"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_lines(env: dict[str, str]) -> str:
    """`export NAME=value` lines (values shell-quoted), or a comment when the plan needs none."""
    for name in env:
        if not _ENV_NAME.match(name):
            raise SpecError(f"invalid environment variable name {name!r} in the plan's environment")
    if not env:
        return "# this plan needs no extra environment (no tensor parallelism)\n"
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(env.items()))


def launch_script(kind: str, plan: Plan, command: list[str], env: dict[str, str] | None = None, *,
                  nnodes: int | None = None, nproc_per_node: int | None = None, master_addr: str = "localhost",
                  master_port: int = DEFAULT_MASTER_PORT, job_name: str = "uniap-megatron",
                  python: str = "python") -> str:
    """Render launch script `kind` (see LAUNCH_KINDS) that runs `command` (the script and its final
    arguments) for `plan`; every value is shell-quoted by render(). `env` defaults to the plan's."""
    if kind not in LAUNCH_KINDS:
        raise SpecError(f"unknown launch script kind '{kind}'; known: {', '.join(LAUNCH_KINDS)}")
    if not command:
        raise SpecError("no training script to launch", "pass the script and its arguments after --")
    nnodes = nnodes or plan.cluster.num_nodes
    nproc_per_node = nproc_per_node or plan.cluster.gpus_per_node
    if kind == "single-node" and nnodes != 1:
        raise SpecError(f"the single-node script runs one node; the plan is for {nnodes}",
                        "use the multi-node or a Slurm script")
    env = megatron_launch(plan).env if env is None else env
    text = render(LAUNCH_KINDS[kind], summary=plan_summary(plan), command=list(command), nnodes=nnodes,
                  last_node=nnodes - 1, nproc_per_node=nproc_per_node, gpus_per_node=nproc_per_node,
                  master_addr=master_addr, master_port=master_port, job_name=" ".join(job_name.split()),
                  python=python)
    # The marker is on a fixed line before any substituted value, so only the template's own one matches.
    return text.replace(ENV_MARKER, env_lines(env), 1)


def torchrun_command(launcher: list[str], command: list[str], nnodes: int, nproc_per_node: int, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """torchrun's arguments (Megatron's canonical launch, frameworks.md 4.1) followed by `command`."""
    if nnodes == 1 and master_addr is None and master_port is None:
        opts = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node)]
    else:
        if nnodes > 1 and not master_addr:
            raise SpecError("a multi-node launch needs --master-addr (the host of node rank 0)")
        if not 0 <= node_rank < nnodes:
            raise SpecError(f"--node-rank {node_rank} is not in 0..{nnodes - 1}")
        opts = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node), "--node-rank", str(node_rank),
                "--master-addr", master_addr or "127.0.0.1", "--master-port", str(master_port or DEFAULT_MASTER_PORT)]
    return [*launcher, *opts, *command]
