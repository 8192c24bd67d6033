"""`uniap`: plan a parallelization (`plan`), price a hand-made one (`evaluate`), list presets.

Exit codes: 0 success; 1 internal error (a bug: please report); 2 invalid input (spec, preset, file,
profile, option); 3 no plan fits in memory; 4 time limit reached before any plan was found.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .cluster.spec import CLUSTER_PRESETS, load_cluster
from .cost.evaluate import check_assignment, evaluate, even_split, split_by_counts
from .cost.model import CostModel
from .cost.strategy import RECOMPUTE_MODES, Pins, Strategy, capability_for, known_targets
from .cost.tables import build_subproblem
from .errors import EXIT_INTERNAL, SpecError, UniapError
from .model.graph import build_graph
from .model.loaders import load_model
from .model.presets import MODEL_PRESETS
from .model.spec import TrainingSpec
from .plan import Plan, make_plan
from .profile.schema import Profile
from .report import render
from .solver.uop import optimize

log = logging.getLogger("uniap")
DEFAULT_MODEL, DEFAULT_CLUSTER, DEFAULT_BATCH = "llama2-7b", "dgx-a100-80g", 512


def _add_job_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset, uniap YAML/JSON spec, or Hugging Face config.json (default {DEFAULT_MODEL})")
    g.add_argument("--cluster", default=DEFAULT_CLUSTER, help=f"preset or YAML/JSON file (default {DEFAULT_CLUSTER})")
    g.add_argument("--nodes", type=int, help="number of nodes (default: the cluster's)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the cluster's)")
    g.add_argument("--global-batch-size", type=int, default=DEFAULT_BATCH, help="samples per iteration")
    g.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    g.add_argument("--decoder-seq-length", type=int, help="target length of an encoder-decoder model")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    g.add_argument("--no-flash-attention", action="store_true",
                   help="the attention kernel keeps the s x s score matrix (adds selective recompute)")
    g.add_argument("--target", default="generic", help=f"what the plan must run on: {', '.join(known_targets())}")
    g.add_argument("--profile", help="measured profile JSON (default: analytic estimate from the cluster)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="write the plan JSON here (refuses to overwrite without --force)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout instead of the table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniap", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 ok, 1 internal error, 2 invalid input, "
                                            "3 no plan fits in memory, 4 time limit before any plan")
    parser.add_argument("--version", action="version", version=f"uniap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="find the optimal plan (MIQP per subproblem, SCIP)")
    _add_job_args(p)
    g = p.add_argument_group("pinned choices (constraints the plan respects)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree of every layer")
    g.add_argument("--pp", type=int, help="pipeline degree")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage of every data-parallel layer")
    g.add_argument("--recompute", choices=RECOMPUTE_MODES, help="recompute mode of every transformer layer")
    g.add_argument("--micro-batch-size", type=int, help="samples per data-parallel replica per micro-batch")
    g = p.add_argument_group("solver")
    g.add_argument("--time-limit", type=float, help="seconds for the whole search; returns the best plan found")
    g.add_argument("--gap", type=float, default=1e-4, help="relative optimality gap (default 1e-4)")
    _add_output_args(p)

    p = sub.add_parser("evaluate", help="price a hand-made configuration with the same cost model")
    _add_job_args(p)
    g = p.add_argument_group("the configuration")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline degree (default 1)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per replica per micro-batch (default 1)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (default 0)")
    g.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none", help="transformer-layer recompute")
    g.add_argument("--split", help="transformer layers per stage, e.g. 9,8,8,7 (default: even)")
    _add_output_args(p)

    sub.add_parser("presets", help="list model and cluster presets and targets")
    return parser


def _job(args):
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.nodes, args.gpus_per_node)
    seq = args.seq_length or (model.vit_seq_length if model.architecture == "vit" else model.max_position_embeddings)
    training = TrainingSpec(global_batch_size=args.global_batch_size, seq_length=seq, precision=args.precision,
                            flash_attention=not args.no_flash_attention,
                            decoder_seq_length=args.decoder_seq_length)
    graph = build_graph(model, training)
    profile = Profile.load(args.profile) if args.profile else None
    capability = capability_for(args.target)
    return model, cluster, training, graph, CostModel(cluster, training, profile), capability


def _check_output(args) -> None:
    if args.output and Path(args.output).exists() and not args.force:
        raise SpecError(f"{args.output} exists; not overwriting it", "pass --force, or choose another -o path")


def _emit(plan: Plan, args, title: str) -> None:
    if args.output:
        plan.save(args.output)
    if args.json:
        print(plan.to_json())
    else:
        print(render(plan, title))
        if args.output:
            print(f"\n  plan written to {args.output}")


def cmd_plan(args) -> int:
    _check_output(args)
    if args.time_limit is not None and args.time_limit <= 0:
        raise SpecError("--time-limit must be positive")
    if not 0 <= args.gap < 1:
        raise SpecError("--gap must be in [0, 1)")
    pins = Pins(tp=args.tp, pipeline_degree=args.pp, zero=args.zero, recompute=args.recompute,
                micro_batch_size=args.micro_batch_size)
    model, cluster, training, graph, cost_model, capability = _job(args)
    outcome = optimize(graph, cluster, training, capability, cost_model, pins=pins, time_limit=args.time_limit,
                       gap=args.gap, progress=None if not args.json else False)
    best = outcome.best
    plan = make_plan(outcome.sub, best.stage_of, best.strategy_of, outcome.prediction, model.to_dict(),
                     outcome.solver_report(), pins.to_dict())
    _emit(plan, args, "uniap plan")
    if outcome.status != "optimal":
        print(f"uniap: warning: stopped at the time limit; best plan found is within {outcome.gap * 100:.2f}% "
              f"of optimal", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    _check_output(args)
    model, cluster, training, graph, cost_model, capability = _job(args)
    if args.tp < 1 or args.pp < 1 or args.micro_batch_size < 1:
        raise SpecError("--tp, --pp and --micro-batch-size must be positive")
    n = cluster.num_gpus
    if n % (args.tp * args.pp):
        raise SpecError(f"the {n} GPUs are not divisible by tp*pp = {args.tp * args.pp}",
                        "choose degrees whose product divides the GPU count")
    dp = n // (args.tp * args.pp)
    micro_batch = args.micro_batch_size * dp
    if training.global_batch_size % micro_batch:
        raise SpecError(f"global batch {training.global_batch_size} is not divisible by micro-batch-size x dp = "
                        f"{args.micro_batch_size} x {dp}", "change --global-batch-size or --micro-batch-size")
    c = training.global_batch_size // micro_batch
    sub = build_subproblem(graph, cluster, training, capability, cost_model, args.pp, c)
    if args.zero and dp == 1:
        raise SpecError(f"--zero {args.zero} needs data parallelism, but dp = 1 here")
    stage_of = split_by_counts(graph, _split(args.split, args.pp)) if args.split else even_split(graph, args.pp)
    strategy_of = [Strategy(args.tp, dp, args.zero if dp > 1 else 0,
                            args.recompute if layer.kind in ("transformer", "cross_transformer") else "none")
                   for layer in graph.layers]
    check_assignment(sub, stage_of, strategy_of)
    pred = evaluate(sub, stage_of, strategy_of)
    plan = make_plan(sub, stage_of, strategy_of, pred, model.to_dict(), {})
    _emit(plan, args, "uniap evaluate")
    if not pred.fits:
        worst = max(pred.stage_memory) / 2 ** 30
        print(f"uniap: warning: this configuration does not fit: its fullest stage needs {worst:.1f} GiB of "
              f"{sub.memory_capacity / 2 ** 30:.1f} GiB usable", file=sys.stderr)
        return 3
    return 0


def _split(text: str, pp: int) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SpecError(f"--split {text!r} must be comma-separated integers, e.g. 9,8,8,7") from None
    if len(counts) != pp:
        raise SpecError(f"--split lists {len(counts)} stages, --pp is {pp}")
    return counts


def cmd_presets(args) -> int:
    print("models:   " + ", ".join(MODEL_PRESETS))
    print("clusters: " + ", ".join(CLUSTER_PRESETS))
    print("targets:  " + ", ".join(known_targets()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"plan": cmd_plan, "evaluate": cmd_evaluate, "presets": cmd_presets}[args.command](args)
    except UniapError as exc:
        print(f"uniap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("uniap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's input
        if getattr(args, "verbose", False):
            raise
        print(f"uniap: internal error (a bug, please report it with -v output): {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
