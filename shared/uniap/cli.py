"""`uniap`: plan a parallelization (`plan`), price a hand-made or saved one (`evaluate`), fit the cost model
to training logs (`calibrate`), list presets. Exit codes: uniap.errors.EXIT_CODE_MEANINGS.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

from . import __version__
from .cluster.spec import CLUSTER_PRESETS, load_cluster
from .cost.strategy import RECOMPUTE_MODES, ZERO_NAMES, Pins, capability_for, known_targets
from .entry import guarded
from .errors import (
    EXIT_INFEASIBLE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    SpecError,
    exit_codes_epilog,
)
from .io import check_output_path
from .model.loaders import load_model
from .model.presets import MODEL_PRESETS
from .model.spec import FP4_RECIPES, FP8_FORMATS, FP8_RECIPES, OVERLAPS, PRECISIONS
from .plan import Plan, make_plan
from .planner import DEFAULT_GAP, Job, check_search_limits, configure, load_plan, load_priced
from .model.spec import training_spec
from .planner import plan as solve
from .profile.schema import Profile
from .calibrate import Measurement, fit
from .profile.logs import FRAMEWORKS, read_log
from .report import render, render_calibration, scale_warning

log = logging.getLogger("uniap")
ZERO_STAGES = tuple(ZERO_NAMES)
DEFAULT_MODEL, DEFAULT_CLUSTER, DEFAULT_BATCH = "llama2-7b", "dgx-a100-80g", 512


JOB_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "cluster": DEFAULT_CLUSTER,
    "global_batch_size": DEFAULT_BATCH,
    "precision": "bf16",
    "target": "generic",
}


def _add_job_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument(
        "--model",
        help=f"preset, uniap YAML/JSON spec, or Hugging Face config.json (default: {DEFAULT_MODEL}; "
        "`uniap presets` lists the presets)",
    )
    g.add_argument("--cluster", help=f"preset or YAML/JSON file (default: {DEFAULT_CLUSTER})")
    g.add_argument("--nodes", type=int, help="number of nodes (default: the cluster's)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the cluster's)")
    g.add_argument("--global-batch-size", type=int, help=f"samples per iteration (default: {DEFAULT_BATCH})")
    g.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    g.add_argument(
        "--decoder-seq-length",
        type=int,
        help="target length of an encoder-decoder model (default: --seq-length)",
    )
    g.add_argument("--precision", choices=PRECISIONS, help="bf16, fp16 or fp32 (default: bf16)")
    g.add_argument(
        "--no-flash-attention",
        action="store_true",
        help="the attention kernel keeps the s x s score matrix, which selective recompute can drop "
        "(default: flash attention)",
    )
    g.add_argument(
        "--no-fused-kernels",
        action="store_true",
        help="Megatron-LM without Transformer Engine or Apex: torch's foreach AdamW (+4 bytes per "
        "parameter at the step) and unfused gradient accumulation (default: fused kernels)",
    )
    g.add_argument(
        "--fp8",
        choices=FP8_RECIPES,
        help="run the transformer layers' linear GEMMs in FP8 with this Transformer Engine recipe, one of "
        "%(choices)s (Megatron's --fp8-recipe; the GPU must run it) (default: no FP8)",
    )
    g.add_argument("--fp8-format", choices=FP8_FORMATS, help="FP8 format with --fp8: %(choices)s (default: hybrid)")
    g.add_argument(
        "--fp4",
        choices=FP4_RECIPES,
        help="run them in FP4 with this recipe instead, one of %(choices)s (Megatron's --fp4-recipe; Blackwell) "
        "(default: no FP4)",
    )
    g.add_argument(
        "--fp8-param-gather",
        action="store_true",
        help="keep and all-gather the linear layers' parameters in FP8 (needs --fp8) (default: bf16 parameters)",
    )
    g.add_argument(
        "--grad-reduce-in-bf16",
        action="store_true",
        help="keep and reduce gradients in bf16 where the framework keeps them in fp32 (Megatron-LM) "
        "(default: the framework's)",
    )
    g.add_argument(
        "--no-overlap",
        action="append",
        choices=OVERLAPS,
        help="do not overlap this communication (repeatable): tp_comm (Megatron's --tp-comm-overlap), "
        "param_gather (--overlap-param-gather) (default: every overlap the target runs)",
    )
    g.add_argument(
        "--target",
        help=f"what the plan must run on: {', '.join(known_targets())} (default: generic, the paper's space)",
    )
    g.add_argument("--profile", help="measured profile JSON (default: analytic estimate from the cluster)")


def _add_plot_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plot", help=f"also draw {what} into this file: .png, .svg or .pdf (default: no picture)")
    p.add_argument("--force", action="store_true", help="overwrite --plot's file if it exists (default: refuse)")


def _add_output_args(p: argparse.ArgumentParser, what: str = "plan") -> None:
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", help=f"write the {what} JSON here, checked before any work (default: not written)")
    g.add_argument("--force", action="store_true", help="overwrite --output if it exists (default: refuse)")
    g.add_argument(
        "--json", action="store_true", help=f"print the {what} as JSON on stdout (default: a table for people)"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: warnings only)")


OFFLOAD_ACTIVATIONS_HELP = (
    "transformer layers whose activations wait in host memory between forward and backward (Megatron-LM's "
    "--cpu-offloading-num-layers; one pipeline stage, no recompute)"
)
EVALUATE_CONFIG = (
    ("--tp", int, 1, "tensor-parallel degree"),
    ("--cp", int, 1, "context-parallel degree (ranks each sequence is split over)"),
    ("--pp", int, 1, "pipeline degree"),
    ("--micro-batch-size", int, 1, "samples per data-parallel replica per micro-batch"),
    ("--virtual-stages", int, 1, "model chunks per pipeline rank (interleaved 1F1B; --split then lists chunks)"),
    ("--offload-activations", int, 0, OFFLOAD_ACTIVATIONS_HELP),
)
EVALUATE_DEFAULTS = {
    "tp": 1,
    "cp": 1,
    "pp": 1,
    "micro_batch_size": 1,
    "virtual_stages": 1,
    "zero": 0,
    "recompute": "none",
    "offload_activations": 0,
}
TABLE_LEGEND = """reading the table:
  stage             the pipeline stage (interleaved: model chunk/rank, e.g. 4/r0)
  time/micro-batch  one micro-batch's forward and backward on the stage (the pipeline's beat)
  memory (GiB)      predicted peak the allocator reserves per GPU / what the GPU leaves usable
  strategies        per stage: how many transformer layers run each strategy (TPn: tensor parallel,
                    CPn: context parallel, DPn: data parallel, ZeRO-n / FSDP: sharding over
                    DP x CP, +rc / +sel-rc: full / selective recompute, +act-offload:
                    activations kept in host memory); "other:" the embedding and head layers
  solver            per subproblem (pipeline degree, micro-batch count): optimal, pruned (its bound
                    cannot beat the best plan), infeasible (no plan fits its memory), no_strategy
                    (no strategy divides its devices and batch), not_solved (time limit)
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniap",
        description="Plan the parallelization of a transformer's pretraining (after UniAP, CVPR 2025): one "
        "mixed-integer program per (pipeline degree, micro-batch count), solved to proven optimality, "
        "chooses the pipeline split and every layer's strategy, and predicts time and memory.",
        epilog=exit_codes_epilog(),
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"uniap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "plan",
        help="find the optimal plan (MIQP per subproblem, SCIP)",
        description="Find the plan with the least predicted time per iteration that fits in memory, "
        "the choices you pin kept as constraints.",
        epilog=TABLE_LEGEND + "\n" + exit_codes_epilog(),
        formatter_class=_formatter,
    )
    _add_job_args(p)
    g = p.add_argument_group("pinned choices (constraints the plan respects; default: the planner chooses)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree of every layer (default: chosen)")
    g.add_argument(
        "--cp",
        type=int,
        help="context-parallel degree: ranks each sequence is split over, for every layer (default: chosen "
        "where the target runs it)",
    )
    g.add_argument("--pp", type=int, help="pipeline degree (default: chosen)")
    g.add_argument(
        "--virtual-stages",
        type=int,
        help="model chunks per pipeline rank, interleaved 1F1B, with an even split (default: chosen where the "
        "target interleaves, else 1)",
    )
    g.add_argument(
        "--zero",
        type=int,
        choices=ZERO_STAGES,
        help="ZeRO stage 0, 1, 2 or 3 of every data-parallel layer (default: chosen)",
    )
    g.add_argument(
        "--recompute",
        choices=RECOMPUTE_MODES,
        help=f"recompute mode of every transformer layer: {', '.join(RECOMPUTE_MODES)} (default: chosen)",
    )
    g.add_argument(
        "--micro-batch-size", type=int, help="samples per data-parallel replica per micro-batch (default: chosen)"
    )
    g.add_argument("--offload-activations", type=int, help=f"{OFFLOAD_ACTIVATIONS_HELP} (default: chosen)")
    g = p.add_argument_group("solver")
    g.add_argument(
        "--time-limit",
        type=float,
        help="seconds for the whole search; returns the best plan found, with its gap (default: no limit)",
    )
    g.add_argument("--gap", type=float, default=DEFAULT_GAP, help="relative optimality gap (default: %(default)g)")
    _add_output_args(p)

    p = sub.add_parser(
        "evaluate",
        help="price a hand-made configuration or a saved plan with the same cost model",
        description="Price one configuration as Megatron-LM names it (TP, CP, PP, micro-batch size per "
        "replica, DP = GPUs / (TP x CP x PP), every transformer layer alike), or a saved plan as it is.",
        epilog=TABLE_LEGEND
        + "\n"
        + exit_codes_epilog(
            note="  exit 3 also when the configuration does not fit (the table is printed all the same)"
        ),
        formatter_class=_formatter,
    )
    _add_job_args(p)
    g = p.add_argument_group("the configuration (or --plan)")
    g.add_argument(
        "--plan",
        help="price this saved plan JSON as it is (its model, cluster, training, split and "
        "strategies; only --profile applies on top) (default: price the options below)",
    )
    for name, kind, default, text in EVALUATE_CONFIG:
        g.add_argument(name, type=kind, help=f"{text} (default: {default})")
    g.add_argument("--zero", type=int, choices=ZERO_STAGES, help="ZeRO stage 0, 1, 2 or 3 (default: 0)")
    g.add_argument(
        "--recompute",
        choices=RECOMPUTE_MODES,
        help=f"transformer-layer recompute: {', '.join(RECOMPUTE_MODES)} (default: none)",
    )
    g.add_argument("--split", help="transformer layers per stage, e.g. 9,8,8,7 (default: even)")
    _add_output_args(p)

    p = sub.add_parser(
        "calibrate",
        help="fit the cost model to training logs of plans that ran; write a profile",
        description="Read Megatron-LM or DeepSpeed training logs (their time per iteration and memory "
        "lines) with the plan each ran, fit the compute scale and the reserved/allocated "
        "memory ratio, print the prediction error before and after, and write a profile "
        "that `--profile` reads.",
        epilog=exit_codes_epilog((EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)),
        formatter_class=_formatter,
    )
    p.add_argument("--log", action="append", required=True, help="training log (repeat, paired with --plan in order)")
    p.add_argument("--plan", action="append", required=True, help="the plan JSON that produced the log")
    p.add_argument(
        "--profile",
        help="a measured profile to keep (its layer times and bandwidths); its old calibration is replaced "
        "(default: a profile of the calibration alone)",
    )
    p.add_argument(
        "--framework", choices=FRAMEWORKS, help="the log's framework: megatron or deepspeed (default: detected)"
    )
    p.add_argument("--skip-warmup", type=int, help="leading logged intervals to ignore (default: the warm-up ones)")
    _add_output_args(p, what="profile")

    p = sub.add_parser(
        "explain",
        help="why a plan: bottleneck, bubble, communication, memory headroom, runner-ups; --plot draws it",
        description="Explain a saved plan: each pipeline rank's time per micro-batch (the kernels' share), its "
        "memory against the device, the bottleneck, the bubble's and the once-per-iteration share of the "
        "iteration, and the subproblems the search compared it with. --plot draws the 1F1B timeline and the "
        "memory per GPU (matplotlib).",
        epilog=exit_codes_epilog((EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)),
        formatter_class=_formatter,
    )
    p.add_argument("plan", help="the saved plan JSON (uniap plan -o plan.json)")
    p.add_argument("--profile", help="price it with this measured profile (default: estimates)")
    _add_plot_args(p, "it")
    p = sub.add_parser(
        "compare",
        help="several saved plans side by side (and one picture with --plot)",
        description="Compare saved plans (uniap plan / evaluate -o, uniap-deepspeed config --save-plan, ...) in "
        "one table: configuration, time per iteration, tokens/s, MFU, peak memory per GPU, how much slower than "
        "the fastest. --plot draws the times and the memory as bars.",
        epilog=exit_codes_epilog((EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)),
        formatter_class=_formatter,
    )
    p.add_argument("plans", nargs="+", help="saved plan JSON files, in the order to list them")
    _add_plot_args(p, "them")
    frameworks = ", ".join(sorted(ep.name for ep in entry_points(group=CONVERTERS))) or "none installed"
    p = sub.add_parser(
        "convert",
        help="price an existing launch as it is, plan it, and write it converted",
        description="Price an existing training launch as it is, plan it, and write it converted, with a "
        f"before/after table. Frameworks: {frameworks}; `uniap convert FRAMEWORK -h` lists its options.",
        usage="uniap convert FRAMEWORK [options]",
        epilog=exit_codes_epilog(),
        formatter_class=_formatter,
    )
    p.add_argument("framework", help=f"the launch's framework: {frameworks}")
    sub.add_parser(
        "presets",
        help="list model and cluster presets and targets",
        description="List the model presets, cluster presets and targets by name.",
        epilog=exit_codes_epilog((EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED)),
        formatter_class=_formatter,
    )
    return parser


def _job(args):
    for name, default in JOB_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.nodes, args.gpus_per_node)
    training = training_spec(
        model,
        args.global_batch_size,
        args.seq_length,
        precision=args.precision,
        flash_attention=not args.no_flash_attention,
        decoder_seq_length=args.decoder_seq_length,
        fused_kernels=not args.no_fused_kernels,
        fp8_recipe=args.fp8,
        fp8_format=args.fp8_format or "hybrid",
        fp8_param_gather=args.fp8_param_gather,
        fp4_recipe=args.fp4,
        grad_reduce_in_bf16=args.grad_reduce_in_bf16,
    )
    capability = capability_for(args.target)  # an unknown target is an input error before anything is solved
    if args.no_overlap:
        runs = capability.job_training(training).overlaps
        training = replace(training, overlaps=tuple(o for o in runs if o not in args.no_overlap))
    return Job(
        model=model,
        cluster=cluster,
        training=training,
        target=args.target,
        profile=Profile.load(args.profile) if args.profile else None,
    )


# The options through which a command reads files: its output may never be one of them.
INPUT_OPTIONS = ("model", "cluster", "profile", "plan", "log")


def _inputs(args) -> list[str]:
    """Every file the command reads, as given on its command line."""
    found: list[str] = []
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        found += value if isinstance(value, list) else [value] if value else []
    return found


def _check_output(args) -> None:
    if args.output is not None:
        check_output_path(args.output, args.force, inputs=_inputs(args))


def _emit(plan: Plan, args, title: str) -> None:
    if args.output is not None:
        plan.save(args.output)
    warning = scale_warning(plan)
    if warning:
        print(f"uniap: warning: {warning}", file=sys.stderr)
    if args.json:
        print(plan.to_json())
    else:
        print(render(plan, title))
        if args.output is not None:
            print(f"\n  plan written to {args.output}")


def cmd_plan(args) -> int:
    _check_output(args)
    check_search_limits(args.time_limit, args.gap)
    pins = Pins(
        tp=args.tp,
        cp=args.cp,
        pipeline_degree=args.pp,
        virtual_stages=args.virtual_stages,
        even_split=args.virtual_stages is not None and args.virtual_stages > 1,
        zero=args.zero,
        recompute=args.recompute,
        micro_batch_per_replica=args.micro_batch_size,
        offloaded_layers=args.offload_activations,
    )
    job = replace(_job(args), pins=pins)
    plan, outcome = solve(job, time_limit=args.time_limit, gap=args.gap, progress=None if not args.json else False)
    _emit(plan, args, "uniap plan")
    if outcome.status != "optimal":
        print(
            f"uniap: warning: stopped at the time limit; best plan found is within {outcome.gap * 100:.2f}% of optimal",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_evaluate(args) -> int:
    _check_output(args)
    if args.plan:
        return _evaluate_plan(args)
    for name, default in EVALUATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    job = _job(args)
    plan, pred = configure(
        job.model,
        job.cluster,
        job.training,
        job.target,
        args.tp,
        args.pp,
        args.micro_batch_size,
        args.zero,
        args.recompute,
        _split(args.split, args.pp * args.virtual_stages) if args.split else None,
        job.profile,
        cp=args.cp,
        virtual_stages=args.virtual_stages,
        offloaded_layers=args.offload_activations,
    )
    return _emit_priced(plan, pred, args)


def _evaluate_plan(args) -> int:
    """`evaluate --plan`: the saved plan as it is, priced with today's cost model (and --profile)."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in (
            *JOB_DEFAULTS,
            *EVALUATE_DEFAULTS,
            "nodes",
            "gpus_per_node",
            "seq_length",
            "decoder_seq_length",
            "split",
        )
        if getattr(args, name) is not None
    ]
    given += [
        flag
        for flag, on in (
            ("--no-flash-attention", args.no_flash_attention),
            ("--no-fused-kernels", args.no_fused_kernels),
        )
        if on
    ]
    if given:
        raise SpecError(
            f"--plan prices the saved plan as it is; it cannot be combined with {', '.join(given)}",
            "drop those options, or re-plan with them",
        )
    saved, priced = load_priced(args.plan, Profile.load(args.profile) if args.profile else None)
    plan = make_plan(priced.sub, priced.stage_of, priced.strategy_of, priced.prediction, saved.model, {}, saved.pins)
    return _emit_priced(plan, priced.prediction, args)


def _emit_priced(plan: Plan, pred, args) -> int:
    _emit(plan, args, "uniap evaluate")
    if not pred.fits:
        worst = max(pred.stage_memory) / 2**30
        print(
            f"uniap: warning: this configuration does not fit: its fullest stage needs {worst:.1f} GiB of "
            f"{pred.memory_capacity / 2**30:.1f} GiB usable",
            file=sys.stderr,
        )
        return EXIT_INFEASIBLE
    return EXIT_OK


def _split(text: str, stages: int) -> list[int]:
    """--split's transformer layers per stage: one count per stage (pipeline degree x model chunks per rank)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SpecError(f"--split {text!r} must be comma-separated integers, e.g. 9,8,8,7") from None
    if len(counts) != stages:
        raise SpecError(f"--split lists {len(counts)} stages, --pp x --virtual-stages is {stages}")
    return counts


def cmd_calibrate(args) -> int:
    """`calibrate`: measured runs -> fitted profile, with the error before and after per run."""
    if not args.output and not args.json:
        raise SpecError("calibrate writes a profile: pass -o PROFILE.json (or --json to print it)")
    _check_output(args)
    if len(args.log) != len(args.plan):
        raise SpecError(f"{len(args.log)} --log but {len(args.plan)} --plan: give one plan per log, in order")
    measurements = []
    for log_path, plan_path in zip(args.log, args.plan):
        plan = load_plan(plan_path)
        batch = plan.training.global_batch_size
        found = read_log(log_path, framework=args.framework, skip_warmup=args.skip_warmup, train_batch_size=batch)
        if found.warmup_only:
            raise SpecError(
                f"{log_path} has only warm-up iterations ({len(found.iteration_times_s)} timed interval(s), all "
                f"including the run's first iterations); their time is not the job's",
                "run the job longer, or pass --skip-warmup 0 to fit them anyway",
            )
        if plan.target in FRAMEWORKS and found.framework != plan.target:
            raise SpecError(
                f"{log_path} is a {found.framework} log, but {plan_path} is a plan for {plan.target}",
                "give each log the plan of the job that wrote it",
            )
        measurements.append(
            Measurement(
                label=Path(log_path).name,
                plan=plan,
                time_per_iteration_s=found.time_per_iteration_s,
                peak_reserved_bytes=found.peak_reserved_bytes,
                peak_allocated_bytes=found.peak_allocated_bytes,
            )
        )
    base = Profile.load(args.profile) if args.profile else None
    result = fit(measurements, base, source=f"uniap calibrate on {', '.join(Path(p).name for p in args.log)}")
    if args.output is not None:
        result.profile.save(args.output)
    if args.json:
        print(json.dumps(result.profile.to_dict(), indent=2))
    else:
        print(render_calibration(result.profile.calibration, args.output))
    return EXIT_OK


def cmd_explain(args) -> int:
    from .explain import explain, plot, render_explanation

    if args.plot:
        check_output_path(args.plot, args.force, "--plot", inputs=_inputs(args))
    plan, priced = load_priced(args.plan, Profile.load(args.profile) if args.profile else None)
    explanation = explain(plan, priced=priced)
    print(render_explanation(explanation))
    if args.plot:
        plot(explanation, args.plot)
        print(f"\n  picture written to {args.plot}")
    return EXIT_OK


def cmd_compare(args) -> int:
    from .explain import compare_table, plot_comparison

    if args.plot:
        check_output_path(args.plot, args.force, "--plot", inputs=[*args.plans, *_inputs(args)])
    plans = [load_plan(path) for path in args.plans]
    names = [Path(path).stem for path in args.plans]
    print(compare_table(plans, names))
    if args.plot:
        plot_comparison(plans, names, args.plot)
        print(f"\n  picture written to {args.plot}")
    return EXIT_OK


def cmd_presets(args) -> int:
    print("models:   " + ", ".join(MODEL_PRESETS))
    print("clusters: " + ", ".join(CLUSTER_PRESETS))
    print("targets:  " + ", ".join(known_targets()))
    return EXIT_OK


CONVERTERS = "uniap.converters"  # entry-point group: a framework's `main(argv) -> exit code`


def convert(argv: list[str]) -> int:
    """`uniap convert FRAMEWORK ...`: the converter an installed adapter declares (the core imports none)."""
    found = {ep.name: ep for ep in entry_points(group=CONVERTERS)}
    if not argv or argv[0].startswith("-"):
        build_parser().parse_args(["convert", *argv[:1]])  # the help, or the usage error (exit 2)
    if argv[0] not in found:
        names = ", ".join(sorted(found)) or "none installed"
        print(f"uniap: error: no converter for {argv[0]!r} (installed: {names})", file=sys.stderr)
        return EXIT_INVALID_INPUT
    return found[argv[0]].load()(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        return convert(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "plan": cmd_plan,
        "evaluate": cmd_evaluate,
        "calibrate": cmd_calibrate,
        "explain": cmd_explain,
        "compare": cmd_compare,
        "presets": cmd_presets,
    }
    return guarded("uniap", lambda: commands[args.command](args), verbose=getattr(args, "verbose", False))


if __name__ == "__main__":
    sys.exit(main())
