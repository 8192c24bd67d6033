"""How true uniap's predictions are: predicted vs measured, with the error printed.

    python benchmarks/cost_model_accuracy.py              # published + layers; whole jobs when a GPU is present
    python benchmarks/cost_model_accuracy.py --published  # the published real runs alone
    python benchmarks/cost_model_accuracy.py --published --plan  # ... and uniap's own plan for each (minutes)
    python benchmarks/cost_model_accuracy.py --smoke      # the whole-job harness on the CPU (a tiny case each)
    python benchmarks/cost_model_accuracy.py --json out.json

Sections:
1. published (--published runs it alone): every row of the published record of real runs
   (benchmarks/data/published: Megatron-Bridge, NeMo, Megatron-LM SC'21 and README, BLOOM, Llama 3), priced
   as its source ran it (benchmarks/published_runs.py), tokens/s per GPU, the error per split: fit (what the
   GPU coefficients were fitted on, benchmarks/fit_published.py), validation (rows published from 2026 on),
   held-out (never fitted). Targets: mean |error| <= 5 % fit, <= 7 % validation, no row beyond 12 %.
2. layers: the analytic layer times (no profile) against layers measured on GPUs (benchmarks/data): an H200
   (two shapes as plain PyTorch modules, one through a DeepSpeed engine) and Galvatron's A100 forward times.
3. jobs (needs a GPU; --smoke runs it on the CPU): whole training iterations of single-GPU jobs run the way the
   frameworks train - megatron-core GPTModel with Float16Module, DistributedDataParallel with an fp32 gradient
   buffer and the distributed optimizer with Adam; DeepSpeed engines - against `uniap`'s prediction for the same
   configuration: time per iteration and peak reserved memory. Targets (one GPU): mean |time error| <= 5 %,
   worst <= 10 %; mean |memory error| <= 5 % and never more than 3 % under. On the CPU the numbers only show
   that the harness runs: the cost model is for GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from uniap.calibrate import run_plan
from uniap.cluster.spec import cluster_preset, device_cluster
from uniap.cost.model import CostModel
from uniap.model.graph import build_graph
from uniap.model.presets import model_preset
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.profile.schema import Profile
from uniap.profile.harness import RunSchedule

import published_runs

DATA = Path(__file__).resolve().parent / "data"


def _percent(predicted: float, measured: float) -> float:
    return (predicted / measured - 1.0) * 100.0


# --- 1. published: benchmarks/published_runs.py ----------------------------------------------------------


# --- 2. layers ---------------------------------------------------------------------------------------------


def _layer(model: ModelSpec, seq: int):
    training = TrainingSpec(global_batch_size=1, seq_length=seq)
    graph = build_graph(model, training)
    return graph, training


def layers() -> list[dict]:
    rows = []
    h200 = cluster_preset("dgx-h200")
    measured = json.loads((DATA / "h200-2026-11-27-layers.json").read_text())
    for entry in measured["layers"]:
        graph, training = _layer(model_preset(entry["shape"]), entry["seq_length"])
        cm = CostModel(h200, training)
        for p in entry["points"]:
            fwd, bwd = cm.estimated_compute_times(graph.layers[1], 1, p["micro_batch_size"])
            rows.append(
                {
                    "gpu": "H200",
                    "layer": f"{entry['shape']} layer (PyTorch)",
                    "seq": entry["seq_length"],
                    "micro_batch_size": p["micro_batch_size"],
                    "measured_ms": (p["forward_ms"], p["backward_ms"]),
                    "estimated_ms": (fwd * 1e3, bwd * 1e3),
                }
            )
    profile = Profile.load(DATA / "h200-2026-11-27-deepspeed-profile.json")
    graph, training = _layer(model_preset("llama2-7b"), 4096)
    cm = CostModel(h200, training)
    for layer in graph.layers:
        if layer.name not in ("embedding", "layer.0", "lm_head"):
            continue
        for t in profile.layers.get(layer.signature, ()):
            fwd, bwd = cm.estimated_compute_times(layer, 1, t.micro_batch_size)
            rows.append(
                {
                    "gpu": "H200",
                    "layer": f"llama2-7b {layer.kind} (DeepSpeed)",
                    "seq": 4096,
                    "micro_batch_size": t.micro_batch_size,
                    "measured_ms": (t.forward_ms, t.backward_ms),
                    "estimated_ms": (fwd * 1e3, bwd * 1e3),
                }
            )
    galvatron = json.loads((DATA / "galvatron-llama2-7b-computation.json").read_text())
    graph, training = _layer(model_preset("llama2-7b"), 2048)
    cm = CostModel(cluster_preset("dgx-a100-80g"), training)
    for mbs in (1, 2, 4, 8, 12):
        fwd, _ = cm.estimated_compute_times(graph.layers[1], 1, mbs)
        per_sample = galvatron[f"layertype_0_bsz{mbs}_seq2048"]
        rows.append(
            {
                "gpu": "A100",
                "layer": "llama2-7b layer (Galvatron)",
                "seq": 2048,
                "micro_batch_size": mbs,
                "measured_ms": (per_sample * mbs, None),
                "estimated_ms": (fwd * 1e3, None),
            }
        )
    return rows


def print_layers(rows: list[dict]) -> None:
    print("2. layers: analytic estimate (no profile) vs measured layer times, ms (forward / backward)")
    print(f"  {'GPU':<5} {'layer':<34} {'seq':>5} {'mbs':>4} {'measured':>17} {'estimated':>17} {'error':>15}")
    errors = []
    for r in rows:
        (mf, mb), (ef, eb) = r["measured_ms"], r["estimated_ms"]
        errors.append(abs(_percent(ef, mf)))
        measured = f"{mf:7.2f} / " + (f"{mb:7.2f}" if mb is not None else "      -")
        estimated = f"{ef:7.2f} / " + (f"{eb:7.2f}" if eb is not None else "      -")
        error = f"{_percent(ef, mf):+6.1f}% / " + (f"{_percent(eb, mb):+5.1f}%" if mb is not None else "     -")
        if mb is not None:
            errors.append(abs(_percent(eb, mb)))
        print(
            f"  {r['gpu']:<5} {r['layer']:<34} {r['seq']:>5} {r['micro_batch_size']:>4} {measured:>17} "
            f"{estimated:>17} {error:>15}"
        )
    print(
        f"  mean |error| {statistics.mean(errors):.1f} %, worst {max(errors):.1f} % (the H200 and A100 defaults "
        f"in shared/uniap/cluster/devices.py are fitted to these points)\n"
    )


# --- 3. whole jobs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One single-GPU job: a model of `layers` layers of a preset's dimensions, trained with `micro_batches`
    micro-batches of `micro_batch_size` samples per iteration."""

    framework: str
    shape: str
    layers: int
    seq_length: int
    micro_batch_size: int
    micro_batches: int
    recompute: str = "none"

    @property
    def label(self) -> str:
        rc = "" if self.recompute == "none" else f" +{self.recompute}-rc"
        return (
            f"{self.framework} {self.shape} L{self.layers} s{self.seq_length} mbs{self.micro_batch_size} "
            f"x{self.micro_batches}{rc}"
        )


# Sized for one H100/H200 in about five minutes together (a few layers of each shape).
GPU_JOBS = (
    Job("megatron", "llama2-7b", 4, 4096, 1, 4),
    Job("megatron", "llama2-7b", 4, 4096, 2, 2),
    Job("megatron", "llama2-7b", 4, 4096, 1, 4, "full"),
    Job("megatron", "llama2-7b", 4, 2048, 4, 2),
    Job("megatron", "gpt3-2.7b", 8, 2048, 2, 4),
    Job("megatron", "gpt3-2.7b", 8, 2048, 8, 1, "full"),
    Job("megatron", "gpt3-13b", 4, 2048, 2, 2),
    Job("megatron", "llama3-8b", 2, 8192, 1, 4),
    Job("deepspeed", "llama2-7b", 4, 4096, 1, 4),
    Job("deepspeed", "gpt3-2.7b", 8, 2048, 4, 2),
)


def _tiny(shape: str) -> ModelSpec:
    base = model_preset(shape)
    return replace(
        base,
        name=f"tiny-{shape}",
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2 if base.num_query_groups else None,
        ffn_hidden_size=128,
        vocab_size=256,
        max_position_embeddings=64,
    )


SMOKE_JOBS = (Job("megatron", "llama2-7b", 2, 32, 2, 2), Job("deepspeed", "gpt3-1.3b", 2, 32, 2, 2))


WARMUP, ITERATIONS = 2, 5
JOB_TIME_TARGET, JOB_TIME_WORST, JOB_MEMORY_TARGET, JOB_MEMORY_UNDER = 5.0, 10.0, 5.0, 3.0


def _runner(framework: str):
    if framework == "megatron":
        from uniap_megatron import training_run
    else:
        from uniap_deepspeed import training_run
    return training_run


def _job_model(job: Job, smoke: bool) -> ModelSpec:
    runner = _runner(job.framework)
    return runner.reduced_model(_tiny(job.shape) if smoke else model_preset(job.shape), job.layers)


def _training(job: Job) -> TrainingSpec:
    return TrainingSpec(global_batch_size=job.micro_batch_size * job.micro_batches, seq_length=job.seq_length)


def _predictions(plan, measured_time_s: float, measured_reserved_bytes: float | None) -> dict:
    """The prediction of `plan` for a measured run, and the errors."""
    row = {
        "predicted_time_s": plan.time_per_iteration,
        "time_error_percent": _percent(plan.time_per_iteration, measured_time_s),
        "predicted_reserved_bytes": plan.stages[0].memory_bytes,
        "basis": plan.basis,
    }
    if measured_reserved_bytes:
        row["memory_error_percent"] = _percent(plan.stages[0].memory_bytes, measured_reserved_bytes)
    return row


def _run_job(job: Job, smoke: bool, profile: Profile | None) -> dict:
    """Train `job` for real and price the same configuration; one row of the table."""
    runner = _runner(job.framework)
    row = {"job": job.label, **asdict(job)}
    extra = {"recompute": job.recompute} if job.framework == "megatron" else {}
    try:
        schedule = RunSchedule(job.micro_batch_size, job.micro_batches, WARMUP, ITERATIONS)
        run = runner.run_training(_job_model(job, smoke), _training(job), profile, schedule, **extra)
    except Exception as exc:  # an out-of-memory or a framework error is a result of this benchmark too
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    row.update(
        measured_time_s=run.time_per_iteration_s,
        measured_reserved_bytes=run.peak_reserved_bytes,
        measured_allocated_bytes=run.peak_allocated_bytes,
        optimizer=run.optimizer,
        loss_first=run.losses[0],
        loss_last=run.losses[-1],
        memory_before_bytes=run.memory_before_bytes,
    )
    row.update(_predictions(run.plan, run.time_per_iteration_s, run.peak_reserved_bytes))
    return row


def reprice(recorded: dict, profile: Profile | None) -> list[dict]:
    """The rows of a recorded run (an earlier --json on a GPU) with the measurements kept and the predictions of
    this version of the cost model, planned as the runners plan (uniap.calibrate.run_plan; Megatron's with the fused
    kernels of this process, uniap_megatron.training_run.training_plan) on the recorded device."""
    cluster = device_cluster(recorded["device"], recorded["device_memory_bytes"])
    rows = []
    for r in recorded["jobs"]:
        if "error" in r:
            rows.append(r)
            continue
        job = Job(**{f.name: r[f.name] for f in fields(Job)})
        schedule = RunSchedule(job.micro_batch_size, job.micro_batches, WARMUP, ITERATIONS)
        model, training = _job_model(job, False), _training(job)
        if job.framework == "megatron":
            plan = _runner(job.framework).training_plan(model, training, profile, schedule, cluster, job.recompute)
        else:
            plan = run_plan(model, training, profile, cluster, job.framework, schedule)
        rows.append({**r, **_predictions(plan, r["measured_time_s"], r.get("measured_reserved_bytes"))})
    return rows


def jobs(smoke: bool, profile: Profile | None) -> list[dict]:
    """Every job of the grid, one after another in this process (world size 1; DeepSpeed's communication
    layer wraps the process group megatron-core uses)."""
    from uniap.profile.runner import default_single_process_env
    from uniap_deepspeed.runtime import init_distributed as init_deepspeed
    from uniap_megatron.runtime import init_distributed

    default_single_process_env()
    init_distributed()
    init_deepspeed()
    return [_run_job(job, smoke, profile) for job in (SMOKE_JOBS if smoke else GPU_JOBS)]


def _device_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def print_jobs(rows: list[dict], device: str, smoke: bool) -> None:
    print(f"3. jobs: whole training iterations on {device} vs uniap's prediction for the same configuration")
    if smoke:
        print("   (CPU smoke run: shows that the harness runs; the cost model is for GPUs, these errors mean nothing)")
    print(
        f"  {'job':<44} {'measured s/it':>13} {'predicted':>10} {'error':>7}   {'reserved GiB':>12} {'predicted':>9} "
        f"{'error':>7}"
    )
    time_errors, memory_errors = [], []
    for r in rows:
        if "error" in r:
            print(f"  {r['job']:<44} failed: {r['error']}")
            continue
        time_errors.append(r["time_error_percent"])
        line = (
            f"  {r['job']:<44} {r['measured_time_s']:>13.4f} {r['predicted_time_s']:>10.4f} "
            f"{r['time_error_percent']:>+6.1f}%"
        )
        if "memory_error_percent" in r:
            memory_errors.append(r["memory_error_percent"])
            measured, predicted = r["measured_reserved_bytes"] / 2**30, r["predicted_reserved_bytes"] / 2**30
            line += f"   {measured:>12.2f} {predicted:>9.2f} {r['memory_error_percent']:>+6.1f}%"
        print(line)
    leftovers = [(r["job"], r["memory_before_bytes"]) for r in rows if (r.get("memory_before_bytes") or 0) >= 2**30]
    for job, left in leftovers:
        print(f"  ({job}: {left / 2**30:.2f} GiB left alive by earlier jobs when it began, not counted in its peak)")
    if time_errors:
        print(
            f"  time: mean |error| {statistics.mean(map(abs, time_errors)):.1f} %, worst "
            f"{max(map(abs, time_errors)):.1f} % (targets {JOB_TIME_TARGET:g} %, {JOB_TIME_WORST:g} %)"
        )
    if memory_errors:
        print(
            f"  peak reserved memory: mean |error| {statistics.mean(map(abs, memory_errors)):.1f} %, most under "
            f"{-min(memory_errors):.1f} % (targets {JOB_MEMORY_TARGET:g} %, under by at most {JOB_MEMORY_UNDER:g} %)"
        )
    print()


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "no torch"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run the whole-job section on the CPU, tiny cases")
    parser.add_argument("--skip-jobs", action="store_true", help="sections 1 and 2 only")
    parser.add_argument("--skip-published", action="store_true", help="section 3 only")
    parser.add_argument("--published", action="store_true", help="section 1 only: the published real runs")
    parser.add_argument(
        "--plan", action="store_true", help="also plan each published job with uniap (minutes) and compare"
    )
    parser.add_argument("--profile", help="price the jobs with this measured profile (default: estimates)")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument(
        "--reprice",
        metavar="JSON",
        help="section 3 from a recorded GPU run (its --json): the measurements it holds, priced by this cost model",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = {}
    if not args.skip_published:
        rows = published_runs.price_corpus()
        published_runs.print_table(rows)
        result = {"published": [asdict(r) for r in rows], "published_summary": published_runs.summary(rows)}
        if args.plan:
            planned = published_runs.plan_rows()
            published_runs.print_plans(planned)
            result["planned"] = [asdict(r) for r in planned]
    if args.published:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"({time.perf_counter() - started:.1f} s)")
        return 0
    if not args.skip_published:
        result["layers"] = layers()
        print_layers(result["layers"])
    device = _device()
    profile = Profile.load(args.profile) if args.profile else None
    if args.reprice:
        recorded = json.loads(Path(args.reprice).read_text())
        result.update(device=recorded["device"], device_memory_bytes=recorded["device_memory_bytes"])
        result["jobs"] = reprice(recorded, profile)
        print(f"   (measured earlier, recorded in {args.reprice}; predictions by this version of the cost model)")
        print_jobs(result["jobs"], recorded["device"], False)
    elif not args.skip_jobs and (args.smoke or device not in ("cpu", "no torch")):
        result["device"], result["device_memory_bytes"] = device, _device_memory()
        result["jobs"] = jobs(args.smoke, profile)
        print_jobs(result["jobs"], device, args.smoke)
    elif not args.skip_jobs:
        print("3. jobs: skipped (no GPU here; --smoke runs the harness on the CPU)\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
