"""`uniap-deepspeed`: DeepSpeed config from a plan (`config`), a multi-node launch (`launch`), and
profiling through DeepSpeed's runtime (`profile`). Exit codes as `uniap` (0 ok, 1 bug, 2 invalid
input, 3 no plan fits, 4 time limit)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from uniap.errors import EXIT_INTERNAL, EXIT_OK, SpecError, UniapError
from uniap.io import write_json_atomic
from uniap.launch_templates import render
from uniap.plan import Plan

from .config import deepspeed_config, plan_for_deepspeed


def _refuse_overwrite(paths: list[str | None], force: bool) -> None:
    for path in paths:
        if path and Path(path).exists() and not force:
            raise SpecError(f"{path} exists; not overwriting it", "pass --force, or choose another path")


def cmd_config(args) -> int:
    _refuse_overwrite([args.output, args.save_plan], args.force)
    if args.plan:
        plan = Plan.load(args.plan)
    else:
        plan = plan_for_deepspeed(
            args.model,
            cluster=args.cluster,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            global_batch_size=args.global_batch_size,
            seq_length=args.seq_length,
            zero_stage=args.zero_stage,
            pipeline_stages=args.pipeline_stages,
            precision=args.precision,
            profile=args.profile,
            time_limit=args.time_limit,
            flash_attention=not args.no_flash_attention,
            decoder_seq_length=args.decoder_seq_length,
        )
    config = deepspeed_config(plan)
    if args.save_plan:
        plan.save(args.save_plan)
    if args.output:
        write_json_atomic(Path(args.output), config)
        u = config["uniap"]
        print(
            f"wrote {args.output}: {u['pipeline_stages']} pipeline stage(s), "
            f"data parallel {u['data_parallel_size']}, "
            f"ZeRO-{config['zero_optimization']['stage']}, micro-batch {config['train_micro_batch_size_per_gpu']} "
            f"x {config['gradient_accumulation_steps']} accumulation steps; predicted "
            f"{u['predicted_time_per_iteration_s']:.3f} s/iteration ({u['basis']['compute']} compute)"
        )
    else:
        print(json.dumps(config, indent=2))
    return EXIT_OK


def cmd_launch(args) -> int:
    """Write a hostfile and a launch script for the plan's nodes."""
    plan = Plan.load(args.plan)
    hosts = [h for h in args.hosts.split(",") if h]
    nodes, gpus = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    if len(hosts) != nodes or len(set(hosts)) != len(hosts):
        raise SpecError(
            f"--hosts names {len(hosts)} distinct host(s); the plan is for {nodes} node(s)",
            "list one host name per node, comma-separated",
        )
    out = Path(args.output_dir)
    hostfile, script, config_path = out / "hostfile", out / "launch.sh", out / "ds_config.json"
    _refuse_overwrite([str(hostfile), str(script), str(config_path)], args.force)
    config = deepspeed_config(plan)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, config)
    hostfile.write_text("".join(f"{h} slots={gpus}\n" for h in hosts))
    summary = " ".join(f"{plan.model.name} on {nodes}x{gpus} GPUs".split())
    script.write_text(
        render(
            "deepspeed_multinode.sh.tmpl",
            summary=summary,
            hostfile="hostfile",
            num_nodes=nodes,
            gpus_per_node=gpus,
            master_addr=hosts[0],
            master_port=args.master_port,
            script=args.script,
            script_args=args.script_args,
            config="ds_config.json",
        )
    )
    script.chmod(0o755)
    print(f"wrote {hostfile}, {config_path} and {script}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniap-deepspeed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="plan for DeepSpeed and write its JSON config")
    p.add_argument("--plan", help="translate a saved plan instead of planning")
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--cluster", default="dgx-a100-80g")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--decoder-seq-length", type=int, help="target length of an encoder-decoder model")
    p.add_argument(
        "--no-flash-attention", action="store_true", help="the attention kernel keeps the s x s score matrix"
    )
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="pinned ZeRO stage (a constraint)")
    p.add_argument("--pipeline-stages", type=int, help="pinned pipeline stages (a constraint)")
    p.add_argument("--profile", help="measured profile JSON")
    p.add_argument("--time-limit", type=float)
    p.add_argument("-o", "--output", help="write the config here (default: print it)")
    p.add_argument("--save-plan", help="also write the plan JSON here")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p = sub.add_parser(
        "launch",
        help="hostfile + deepspeed launcher script for a saved plan; the training script's own arguments follow --",
    )
    p.add_argument("plan")
    p.add_argument("--hosts", required=True, help="comma-separated host names, one per node")
    p.add_argument("--script", required=True, help="the training script")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--output-dir", default=".")
    p.add_argument("--force", action="store_true")
    sub.add_parser("profile", help="profile layers and collectives through DeepSpeed (see --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        from .profile import main_profile

        return main_profile(argv[1:])
    script_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.script_args = script_args
    try:
        return {"config": cmd_config, "launch": cmd_launch}[args.command](args)
    except UniapError as exc:
        print(f"uniap-deepspeed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug, not the user's input
        print(
            f"uniap-deepspeed: internal error (a bug, please report it): {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
