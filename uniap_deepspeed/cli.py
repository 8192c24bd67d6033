"""`uniap-deepspeed`: DeepSpeed config from a plan (`config`), a multi-node launch (`launch`), and
profiling through DeepSpeed's runtime (`profile`). Exit codes as `uniap` (uniap.errors: 0 ok, 1 bug,
2 invalid input, 3 no plan fits, 4 time limit, 130 interrupted); each command's --help lists its own."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from uniap.errors import (
    ALL_EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    SpecError,
    exit_codes_epilog,
)
from uniap.entry import adapter_main, add_profile_command
from uniap.io import check_output_paths, write_json_atomic, write_text_atomic
from uniap.launch_templates import render
from uniap.cost.strategy import OFFLOAD_MODES, Pins
from uniap.planner import ineffective_pins, load_plan
from uniap.report import plural

from .config import (
    DEFAULT_BATCH,
    DEFAULT_PRECISION,
    check_hf_plan,
    deepspeed_config,
    precision_notes,
    variant_notes,
    vocabulary_notes,
    hf_pipeline_stages,
    plan_for_deepspeed,
    read_base,
)
from .merge import base_job, merge_config, trainer_arguments

PROG = "uniap-deepspeed"
PLAN_FILE = "plan.json"
# How a training script takes the config: DeepSpeed's own argument style (deepspeed.add_config_arguments) or
# Hugging Face Trainer's (--deepspeed PATH; "argument --deepspeed: expected one argument" otherwise).
HF = "hf"
NO_SSH_CHECK = "--no_ssh_check"  # deepspeed launcher/runner.py
CONFIG_FLAGS = {"deepspeed": ("--deepspeed", "--deepspeed_config"), HF: ("--deepspeed",)}


# DeepSpeed 0.19.8 launcher/multinode_runner.py PDSHRunner.parse_user_args wraps an argument holding a space in
# double quotes (escaping its double quotes) and passes every other one as it is; pdsh joins the words into one
# command line that a shell on each node parses again.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_SPECIAL_IN_DOUBLE_QUOTES = re.compile(r"([\\$`])")


def for_remote_shell(arg: str) -> str:
    """`arg` as the deepspeed launcher must receive it for the training script on every node to get `arg`."""
    if " " in arg:
        return _SPECIAL_IN_DOUBLE_QUOTES.sub(r"\\\1", arg)
    return arg if _SHELL_SAFE.fullmatch(arg) else shlex.quote(arg)


def with_trainer_arguments(script_args: list[str], required: list[str]) -> list[str]:
    """`script_args` with the Trainer arguments the config requires added; SpecError where the script's own
    arguments say otherwise (the Trainer would refuse the config)."""
    given: dict[str, str | None] = {}
    for i, arg in enumerate(script_args):
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            nxt = script_args[i + 1] if i + 1 < len(script_args) else None
            given[flag] = value or (nxt if nxt is not None and not nxt.startswith("--") else None)
    out = list(script_args)
    i = 0
    while i < len(required):
        flag = required[i]
        value = required[i + 1] if i + 1 < len(required) and not required[i + 1].startswith("--") else None
        i += 2 if value is not None else 1
        other = {"--bf16": "--fp16", "--fp16": "--bf16"}.get(flag)
        if other in given and given[other] not in ("False", "false", "0"):
            raise SpecError(
                f"the script's arguments pass {other}, the plan trains in {flag[2:]}",
                f"drop {other} from the arguments after --; uniap adds {flag}",
            )
        if flag not in given:
            out += [flag] if value is None else [flag, value]
        elif value is not None and given[flag] != value:
            raise SpecError(
                f"the script's arguments pass {flag} {given[flag]}, the plan's config needs {value}",
                f"drop {flag} from the arguments after --; uniap adds the plan's value",
            )
    return out


def _report_trainer_arguments(config: dict) -> None:
    print(
        f"{PROG}: pass the Trainer {' '.join(trainer_arguments(config))} (the config's micro-batch, accumulation "
        'and precision; the Trainer refuses a mismatch and fills every "auto" from its own arguments)',
        file=sys.stderr,
    )


def cmd_config(args) -> int:
    inputs = [args.base, args.plan, args.model, args.cluster, args.profile]
    check_output_paths([args.output, args.save_plan], args.force, inputs)
    base = read_base(args.base) if args.base else None
    job = base_job(base) if base else {}
    if args.global_batch_size is None:
        args.global_batch_size = job.get("global_batch_size", DEFAULT_BATCH)
    if args.precision is None:
        args.precision = job.get("precision", DEFAULT_PRECISION)
    if args.plan:
        plan = load_plan(args.plan)
        if args.hf:
            check_hf_plan(plan)
    else:
        if args.hf:
            args.pipeline_stages = hf_pipeline_stages(args.pipeline_stages)
        plan = plan_for_deepspeed(
            args.model,
            cluster=args.cluster,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            global_batch_size=args.global_batch_size,
            seq_length=args.seq_length,
            zero_stage=args.zero_stage,
            offload=args.offload,
            pipeline_stages=args.pipeline_stages,
            precision=args.precision,
            profile=args.profile,
            time_limit=args.time_limit,
            flash_attention=not args.no_flash_attention,
            decoder_seq_length=args.decoder_seq_length,
        )
        for note in ineffective_pins(plan, Pins(zero=args.zero_stage)) + plan.notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    merged = merge_config(deepspeed_config(plan), base, hf=args.hf)
    config = merged.config
    if args.save_plan:
        plan.save(args.save_plan)
    for line in merged.report_lines():
        print(f"{PROG}: {line.strip()}", file=sys.stderr)
    for note in precision_notes(config) + vocabulary_notes(plan) + variant_notes(config):
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if args.hf:
        _report_trainer_arguments(config)
    if args.output is not None:
        write_json_atomic(Path(args.output), config)
        u = config["uniap"]
        print(
            f"wrote {args.output}: {u['pipeline_stages']} pipeline stage(s), "
            f"data parallel {u['data_parallel_size']}, "
            f"{u['zero']}, micro-batch {config['train_micro_batch_size_per_gpu']} "
            f"x {plural(config['gradient_accumulation_steps'], 'accumulation step')}; predicted "
            f"{u['predicted_time_per_iteration_s']:.3f} s/iteration ({u['basis']['compute']} compute)"
        )
    else:
        print(json.dumps(config, indent=2))
    return EXIT_OK


def cmd_launch(args) -> int:
    """Write a hostfile and a launch script for the plan's nodes."""
    plan = load_plan(args.plan)
    hosts = [h for h in args.hosts.split(",") if h]
    nodes, gpus = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    if len(hosts) != nodes or len(set(hosts)) != len(hosts):
        raise SpecError(
            f"--hosts names {len(hosts)} distinct host(s); the plan is for {nodes} node(s)",
            "list one host name per node, comma-separated",
        )
    out = Path(args.output_dir)
    hostfile, script, config_path = out / "hostfile", out / "launch.sh", out / "ds_config.json"
    plan_path = out / PLAN_FILE
    inputs = [args.base, args.plan, args.script]
    check_output_paths([str(hostfile), str(script), str(config_path), str(plan_path)], args.force, inputs)
    hf = args.config_arg == HF
    if hf:
        check_hf_plan(plan)
    merged = merge_config(deepspeed_config(plan), read_base(args.base) if args.base else None, hf=hf)
    config = merged.config
    for line in merged.report_lines():
        print(f"{PROG}: {line.strip()}", file=sys.stderr)
    script_args = list(args.script_args)
    if hf:
        script_args = with_trainer_arguments(script_args, trainer_arguments(config))
    if nodes > 1:  # DeepSpeed's pdsh runner hands the arguments to a shell on every node
        script_args = [for_remote_shell(a) for a in script_args]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, config)
    plan.save(plan_path)
    write_text_atomic(hostfile, "".join(f"{h} slots={gpus}\n" for h in hosts))
    summary = " ".join(f"{plan.model.name} on {nodes}x{gpus} GPUs".split())
    write_text_atomic(
        script,
        render(
            "deepspeed_multinode.sh.tmpl",
            summary=summary,
            hostfile="hostfile",
            num_nodes=nodes,
            gpus_per_node=gpus,
            # With a hostfile DeepSpeed's runner checks ssh to the first host even when it is the only one.
            launcher_flags=[] if nodes > 1 else [NO_SSH_CHECK],
            master_addr=hosts[0],
            master_port=args.master_port,
            script=args.script,
            script_args=script_args,
            config_flags=list(CONFIG_FLAGS[args.config_arg]),
            config="ds_config.json",
        ),
        executable=True,
    )
    print(f"wrote {hostfile}, {config_path}, {plan_path} and {script}")
    return EXIT_OK


DESCRIPTION = """\
Plan a training job for DeepSpeed and write its JSON config (`config`), write a
hostfile and a launch script for a saved plan's nodes (`launch`), or profile
layers and collectives through DeepSpeed's runtime (`profile`).
`uniap-deepspeed COMMAND --help` describes each command."""
CONFIG_DESCRIPTION = """\
Find the best plan for DeepSpeed (pipeline stages, ZeRO stage, micro-batch size)
with uniap's planner, or read a saved plan with --plan, and write the DeepSpeed
JSON config that runs it; its `uniap` section records the plan and its
prediction. Without -o the config is printed."""
LAUNCH_DESCRIPTION = """\
Write hostfile, ds_config.json, plan.json (for PlannedPipelineModule) and
launch.sh into --output-dir for a saved plan; launch.sh runs the deepspeed
launcher over the plan's nodes and passes the config as the script expects
(--config-arg). The training script's own arguments follow `--`:
  uniap-deepspeed launch plan.json --hosts n1,n2 --script train.py -- --epochs 1"""
COMMAND_CODES = (EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)


def _subparser(sub, name: str, summary: str, description: str, codes=ALL_EXIT_CODES) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=exit_codes_epilog(codes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniap-deepspeed",
        description=DESCRIPTION,
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _subparser(sub, "config", "plan for DeepSpeed and write its JSON config", CONFIG_DESCRIPTION)
    g = p.add_argument_group("job (ignored with --plan)")
    g.add_argument(
        "--model",
        default="llama2-7b",
        help="model preset, uniap YAML/JSON spec, or Hugging Face config.json (default: %(default)s)",
    )
    g.add_argument("--cluster", default="dgx-a100-80g", help="cluster preset or YAML/JSON file (default: %(default)s)")
    g.add_argument("--nodes", type=int, help="number of nodes (default: the cluster's)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the cluster's)")
    g.add_argument(
        "--global-batch-size",
        type=int,
        help=f"samples per training iteration (default: --base's train_batch_size, else {DEFAULT_BATCH})",
    )
    g.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    g.add_argument(
        "--decoder-seq-length",
        type=int,
        help="target length of an encoder-decoder model (default: the model's maximum; other models: unused)",
    )
    g.add_argument(
        "--no-flash-attention",
        action="store_true",
        help="plan for an attention kernel that keeps the s x s score matrix (default: flash attention)",
    )
    g.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        help=f"training precision: %(choices)s (default: the one --base enables, else {DEFAULT_PRECISION})",
    )
    g.add_argument("--profile", help="measured profile JSON to plan with (default: analytic estimate from the cluster)")
    g = p.add_argument_group("pinned choices (constraints the plan respects)")
    g.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help="ZeRO stage, one of %(choices)s (default: the planner chooses)",
    )
    g.add_argument("--pipeline-stages", type=int, help="number of pipeline stages (default: the planner chooses)")
    g.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        help="model states offloaded to host memory: %(choices)s (params: the optimizer's and the parameters, "
        "ZeRO-3) (default: the planner chooses, when the cluster describes its hosts)",
    )
    g = p.add_argument_group("solver")
    g.add_argument(
        "--time-limit",
        type=float,
        help="seconds for the whole search; returns the best plan found by then (default: no limit)",
    )
    g = p.add_argument_group("input and output")
    g.add_argument(
        "--plan", help="translate this saved plan JSON instead of planning (default: plan from the job options)"
    )
    g.add_argument(
        "--base",
        help="your DeepSpeed config JSON: kept as it is except the batch, parallelism, memory and precision keys "
        "the plan sets, each change printed (default: a complete config whose AdamW, warm-up scheduler and "
        "clipping 1.0 are defaults to review)",
    )
    g.add_argument(
        "--hf",
        action="store_true",
        help='for a Hugging Face Trainer / Accelerate script: one pipeline stage, "auto" optimizer, scheduler '
        "and clipping (the Trainer fills them), and the Trainer arguments the batch needs printed (default: a "
        "config for a DeepSpeed script)",
    )
    g.add_argument("-o", "--output", help="write the config JSON to this file (default: print it on stdout)")
    g.add_argument("--save-plan", help="also write the plan JSON to this file (default: not written)")
    g.add_argument(
        "--force", action="store_true", help="overwrite --output / --save-plan if they exist (default: refuse)"
    )

    p = _subparser(
        sub,
        "launch",
        "write a hostfile, ds_config.json and a deepspeed launch script for a saved plan",
        LAUNCH_DESCRIPTION,
        COMMAND_CODES,
    )
    p.add_argument("plan", help="the saved plan JSON (uniap plan --target deepspeed -o plan.json)")
    p.add_argument("--hosts", required=True, help="comma-separated host names, one per node of the plan (required)")
    p.add_argument("--script", required=True, help="the training script launch.sh runs (required)")
    p.add_argument(
        "--master-port", type=int, default=29500, help="rendezvous port on the first host (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir",
        default=".",
        help="folder for hostfile, ds_config.json and launch.sh (default: the current folder)",
    )
    p.add_argument(
        "--base",
        help="your DeepSpeed config JSON, merged as in `config --base` (default: a complete config whose "
        "optimizer, scheduler and clipping are defaults to review)",
    )
    p.add_argument(
        "--config-arg",
        choices=tuple(CONFIG_FLAGS),
        default="deepspeed",
        help="how the script takes the config: deepspeed (--deepspeed --deepspeed_config PATH, DeepSpeed's "
        "add_config_arguments) or hf (--deepspeed PATH, Hugging Face Trainer: the config as `config --hf` "
        "writes it, and the Trainer's batch and precision arguments added) (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="overwrite those files if they exist (default: refuse)")
    add_profile_command(sub, "layer times and collective bandwidths through DeepSpeed")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"config": cmd_config, "launch": cmd_launch}
    return adapter_main(PROG, argv, build_parser(), commands, "uniap_deepspeed.profile")


if __name__ == "__main__":
    sys.exit(main())
