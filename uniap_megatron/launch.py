"""The launch scripts that run a Megatron-LM plan: torchrun on one or many nodes and Slurm (templates in
launch_templates/), the environment the ranks need, and torchrun's own command line.
"""

from __future__ import annotations

import re
import shlex

from uniap.errors import SpecError
from uniap.launch_templates import render
from uniap.plan import Plan
from uniap.report import plural

from .args import megatron_launch

DEFAULT_MASTER_PORT = 29500


def plan_summary(plan: Plan) -> str:
    """One line (whitespace collapsed, safe in a shell comment) describing the plan."""
    s = plan.uniform_strategy
    c = plan.cluster
    cp = f" CP{s.cp}" if s and s.cp > 1 else ""
    vpp = f"x{plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    par = f"TP{s.tp}{cp} PP{plan.pipeline_degree}{vpp} DP{s.dp}" if s else f"PP{plan.pipeline_degree}{vpp}"
    text = (
        f"{plan.model.name} on {c.num_nodes}x{c.gpus_per_node} {c.gpu_name}: {par}, "
        f"micro-batch size {plan.micro_batch_per_replica} x {plural(plan.micro_batches, 'micro-batch')}, predicted "
        f"{plan.time_per_iteration:.4g} s/iteration ({plan.basis.get('compute', 'estimated')} compute)"
    )
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


def launch_script(
    kind: str,
    plan: Plan,
    command: list[str],
    env: dict[str, str] | None = None,
    *,
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    master_addr: str = "localhost",
    master_port: int = DEFAULT_MASTER_PORT,
    job_name: str = "uniap-megatron",
    python: str = "python",
) -> str:
    """Render launch script `kind` (see LAUNCH_KINDS) that runs `command` (the script and its final
    arguments) for `plan`; every value is shell-quoted by render(). `env` defaults to the plan's."""
    if kind not in LAUNCH_KINDS:
        raise SpecError(f"unknown launch script kind '{kind}'; known: {', '.join(LAUNCH_KINDS)}")
    if not command:
        raise SpecError("no training script to launch", "pass the script and its arguments after --")
    nnodes = nnodes or plan.cluster.num_nodes
    nproc_per_node = nproc_per_node or plan.cluster.gpus_per_node
    if kind == "single-node" and nnodes != 1:
        raise SpecError(
            f"the single-node script runs one node; the plan is for {nnodes}", "use the multi-node or a Slurm script"
        )
    env = megatron_launch(plan).env if env is None else env
    text = render(
        LAUNCH_KINDS[kind],
        summary=plan_summary(plan),
        command=list(command),
        nnodes=nnodes,
        last_node=nnodes - 1,
        nproc_per_node=nproc_per_node,
        gpus_per_node=nproc_per_node,
        master_addr=master_addr,
        master_port=master_port,
        job_name=" ".join(job_name.split()),
        python=python,
    )
    # The marker is on a fixed line before any substituted value, so only the template's own one matches.
    return text.replace(ENV_MARKER, env_lines(env), 1)


def torchrun_command(
    launcher: list[str],
    command: list[str],
    nnodes: int,
    nproc_per_node: int,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """torchrun's arguments (Megatron's canonical launch, frameworks.md 4.1) followed by `command`."""
    if nnodes == 1 and master_addr is None and master_port is None:
        opts = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node)]
    else:
        if nnodes > 1 and not master_addr:
            raise SpecError("a multi-node launch needs --master-addr (the host of node rank 0)")
        if not 0 <= node_rank < nnodes:
            raise SpecError(f"--node-rank {node_rank} is not in 0..{nnodes - 1}")
        opts = [
            "--nnodes",
            str(nnodes),
            "--nproc-per-node",
            str(nproc_per_node),
            "--node-rank",
            str(node_rank),
            "--master-addr",
            master_addr or "127.0.0.1",
            "--master-port",
            str(master_port or DEFAULT_MASTER_PORT),
        ]
    return [*launcher, *opts, *command]
