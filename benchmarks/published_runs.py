"""The published record of large real training runs (benchmarks/data/published/), priced by uniap's cost model.

Each row is priced as its source ran it: its GPUs (the preset of its system), model, batch, sequence, precision
and FP8 recipe, TP/PP/CP/VP, micro-batch size, the distributed optimizer or FSDP, recompute and the overlaps the
source states (`uniap.planner.configure`, target megatron). The error is uniap's tokens/s per GPU against the
published one; a source that publishes TFLOP/s only is turned into tokens/s with that source's own FLOP count.

Rows fall into three splits: `held-out` (sources kept out of every fit on purpose: the Megatron-LM README's
scaling table, the Llama 3 paper's Table 4), `validation` (published from VALIDATION_FROM on), `fit` (the rest):
coefficients are fitted on `fit` only (benchmarks/fit_published.py), and the errors are reported per split.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from uniap.cluster.spec import PRESET_OF_FAMILY, cluster_preset
from uniap.errors import SpecError, UniapError
from uniap.model.spec import PARAM_GATHER_OVERLAP, TP_COMM_OVERLAP, ModelSpec, TrainingSpec
from uniap.planner import Job, configure, plan
from uniap.report import short_label

CORPUS = Path(__file__).resolve().parent / "data" / "published"
FIT, VALIDATION, HELD_OUT = "fit", "validation", "held-out"
SPLITS = (FIT, VALIDATION, HELD_OUT)
# Rows published from this month on validate what the earlier ones fitted (containers 26.04 and later). The
# boundary sits after 26.02, the first container with NVFP4 rows, so that every precision has rows to fit: with
# the boundary at 26.01 NVFP4 had none, and its estimated efficiency (the FP8 fraction of the FP4 peak) came out
# 8-22 % too fast on all 18 NVFP4 rows (benchmarks/RESULTS.md).
VALIDATION_FROM = "2026-04"
# Targets of issue 20: mean |error| on the fit and validation splits, and no row beyond the last.
TARGETS = {FIT: 5.0, VALIDATION: 7.0}
WORST_TARGET = 12.0
# FlashAttention was released in May 2022; rows before it ran attention that keeps the s x s scores.
FLASH_ATTENTION_SINCE = "2022-06"
# The micro-batch sizes tried where a source does not state its own (the fastest that fits is taken, else the
# leanest).
MICRO_BATCH_SIZES = (1, 2, 4, 8)
# A recipe a source leaves unnamed: Transformer Engine's per-tensor current scaling, the one NeMo 25.x ran.
DEFAULT_FP8_RECIPE = "tensorwise"
# What NeMo's and Megatron-Bridge's performance recipes set where a row does not say (their perf configs: the
# distributed optimizer with both overlaps, TP communication overlap at TP > 1, gradients reduced in bf16).
RECIPE_DEFAULTS = {
    "distributed_optimizer": True,
    "overlap_param_gather": True,
    "tp_comm_overlap": True,
    "grad_reduce_in_fp32": False,
}
RECIPE_FRAMEWORKS = ("NeMo", "Megatron-Bridge")
# Megatron-DeepSpeed (BLOOM's) ran TP without sequence parallelism: norms and dropout on every TP rank, which
# uniap's Megatron pricing (sequence parallel at TP > 1) does not describe.
NO_SEQUENCE_PARALLEL = ("Megatron-DeepSpeed",)


@dataclass
class PricedRow:
    """One published row and uniap's price of it (or why it was not priced)."""

    id: str
    source: str
    split: str
    gpu: str
    label: str
    measured: float  # tokens/s per GPU, as published or converted with the source's FLOP count
    predicted: float | None = None
    micro_batch_size: int | None = None
    fits: bool | None = None
    # uniap's allocated peak per GPU over what the GPU leaves PyTorch: above 1 the run could not have fit (an
    # error of the memory model); between the plan's margin and 1 it fits, but uniap's plans keep more free.
    memory_share: float | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def error_percent(self) -> float | None:
        return None if self.predicted is None else (self.predicted / self.measured - 1.0) * 100.0


# --- the sources' FLOP counts (per token), to turn a published TFLOP/s into tokens/s ------------------------


def _padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // (128 * tp)) * 128 * tp


def megatron_flops(model: ModelSpec, seq: int, tp: int, causal: bool = True) -> float:
    """Megatron-LM core_v0.16.1 training.py num_floating_point_operations (= Megatron-Bridge flop_utils.py
    transformer_flops): 6 x [L (GEMMs of the FFN, QKV, projection + causal attention q s) + h V_padded];
    before 2025 (core_r0.8.0) the attention was counted in full, 2 q s."""
    h, q, kv = model.hidden_size, model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim
    ffn = (3 if model.gated_mlp else 2) * h * model.ffn_hidden_size
    layer = ffn + h * (q + 2 * kv) + q * h + q * seq * (1 if causal else 2)
    return 6.0 * (model.num_layers * layer + h * _padded_vocab(model.vocab_size, tp))


def narayanan_flops(model: ModelSpec, seq: int, recompute: bool) -> float:
    """Narayanan et al. 2021 Eq. 3 per token: 24 f l h^2 (1 + s/6h + V/16lh), f = 4 with recompute, else 3."""
    h, layers = model.hidden_size, model.num_layers
    f = 4 if recompute else 3
    return 24 * f * layers * h**2 * (1 + seq / (6 * h) + model.vocab_size / (16 * layers * h))


def nemo_flops(model: ModelSpec, seq: int) -> float:
    """NeMo's FLOPsMeasurementCallback (perf_metrics.py / flops_formulas.py) per token: GPT-3
    72 L h^2 + 12 L s h + 6 h V; Llama 18 ffn/h (gated), Nemotron 12 ffn/h (squared ReLU), with GQA."""
    h, layers, v = model.hidden_size, model.num_layers, model.vocab_size
    if model.architecture == "decoder" and not model.gated_mlp and model.query_groups == model.num_attention_heads:
        if model.position_embedding == "learned":  # GPT-3
            return 72 * layers * h * h + 12 * layers * seq * h + 6 * h * v
    g, a = model.query_groups, model.num_attention_heads
    ffn = (18 if model.gated_mlp else 12) * model.ffn_hidden_size / h
    return layers * h * h * (12 + 12 * g / a + ffn + 12 * seq / h + 6 * v / (layers * h))


def flops_per_token(source: str, model: ModelSpec, seq: int, tp: int, recompute: bool) -> float:
    """The FLOPs per token the source counted for its TFLOP/s column."""
    if source in ("megatron-lm-sc21", "deepspeed"):
        return narayanan_flops(model, seq, recompute)
    if source == "nemo":
        return nemo_flops(model, seq)
    return megatron_flops(model, seq, tp, causal=source != "megatron-lm-readme")


# --- pricing --------------------------------------------------------------------------------------------------


def load_rows() -> list[tuple[str, bool, dict]]:
    """(source name, held out, row) for every row of every source file."""
    out = []
    for path in sorted(CORPUS.glob("*.json")):
        data = json.loads(path.read_text())
        out += [(path.stem, bool(data.get("held_out")), row) for row in data["rows"]]
    return out


def split_of(row: dict, held_out: bool) -> str:
    if held_out:
        return HELD_OUT
    return VALIDATION if row["date"] >= VALIDATION_FROM else FIT


def recompute_of(flags: dict) -> str:
    """uniap's recompute mode for a source's statement. Recomputing only the first few layers of each stage
    (recompute_method 'block') is priced without recompute: uniap recomputes every layer or none."""
    stated = str(flags.get("recompute", "none")).lower()
    if flags.get("recompute_method") == "block":
        return "none"
    return "full" if stated.startswith("full") else "selective" if stated.startswith("selective") else "none"


def optimizer_states_of(flags: dict) -> dict:
    """TrainingSpec fields for a run whose optimizer keeps its states in 16 bits (`optimizer_states_dtype`):
    Apex's DistributedFusedAdam with dtype bf16 (NeMo 1.0's distributed_fused_adam) holds bf16 parameter shards
    and moments, the bytes of Megatron's precision-aware optimizer with bf16 gradients, fp32 masters kept as
    bf16 remainders, and bf16 moments."""
    if flags.get("optimizer_states_dtype") != "bf16":
        return {}
    return {
        "precision_aware_optimizer": True,
        "main_grads_dtype": "bf16",
        "exp_avg_dtype": "bf16",
        "exp_avg_sq_dtype": "bf16",
    }


def offloaded_layers_of(flags: dict) -> int:
    """Transformer layers whose activations the source's run kept in host memory (Megatron's
    --cpu-offloading-num-layers; Megatron-Bridge's cpu_offloading_num_layers with cpu_offloading)."""
    if not flags.get("cpu_offloading") or flags.get("cpu_offloading_activations") is False:
        return 0
    return int(flags.get("cpu_offloading_num_layers") or 0)


def preset_of(gpu: str) -> str | None:
    """The cluster preset of the system the source ran: the one uniap gives a detected GPU of that family."""
    return next((preset for family, preset in PRESET_OF_FAMILY if family in gpu.upper()), None)


def flags_of(row: dict) -> dict:
    """What the row states beyond the degrees, with its framework's performance-recipe defaults where it is
    silent (RECIPE_DEFAULTS)."""
    flags = row.get("flags") or {}
    return {**RECIPE_DEFAULTS, **flags} if row["framework"] in RECIPE_FRAMEWORKS else flags


def job_of(row: dict) -> Job:
    """The row's job for uniap: the preset of its GPUs reshaped to its GPU count, its model (positions long
    enough for its sequence), its batch, sequence, precision, FP8 recipe and the overlaps and gradient dtype it
    states. SpecError where uniap cannot describe it."""
    flags = flags_of(row)
    model = ModelSpec.from_dict(row["model"])
    seq, tp = row["seq_length"], row["tp"]
    if row["framework"] in NO_SEQUENCE_PARALLEL and tp > 1:
        raise SpecError(f"TP without sequence parallelism ({row['framework']}) is not modelled")
    preset = preset_of(row["gpu"])
    if preset is None:
        raise SpecError(f"no cluster preset for {row['gpu']}")
    if row["precision"] not in ("bf16", "fp16", "fp8", "nvfp4"):
        raise SpecError(f"{row['precision']} is not modelled yet")
    cluster = cluster_preset(preset)
    gpus, per_node = row["gpus"], cluster.gpus_per_node
    cluster = cluster.with_shape(max(1, gpus // per_node), min(gpus, per_node))
    if model.max_position_embeddings < seq:
        model = ModelSpec.from_dict({**row["model"], "max_position_embeddings": seq})
    overlaps = tuple(
        o
        for o, key in ((TP_COMM_OVERLAP, "tp_comm_overlap"), (PARAM_GATHER_OVERLAP, "overlap_param_gather"))
        if flags.get(key)
    )
    fp8, fp4 = row["precision"] == "fp8", row["precision"] == "nvfp4"
    training = TrainingSpec(
        global_batch_size=row["global_batch_size"],
        seq_length=seq,
        precision="bf16" if fp8 or fp4 else row["precision"],
        fp4_recipe="nvfp4" if fp4 else None,
        flash_attention=flags.get("flash_attention", row["date"] >= FLASH_ATTENTION_SINCE),
        fp8_recipe=(row.get("recipe") or DEFAULT_FP8_RECIPE) if fp8 else None,
        overlaps=overlaps,
        # Megatron-Bridge and NeMo reduce gradients in bf16 unless the source says fp32 (grad_reduce_in_fp32).
        grad_reduce_in_bf16=row["precision"] != "fp16" and flags.get("grad_reduce_in_fp32") is False,
        fp8_param_gather=fp8 and bool(flags.get("fp8_param_gather")),
        **optimizer_states_of(flags),
    )
    return Job(model=model, cluster=cluster, training=training, target="megatron")


def price_row(source: str, held_out: bool, row: dict) -> PricedRow:
    """uniap's tokens/s per GPU for one row, configured as the source states it."""
    flags = flags_of(row)
    recompute = recompute_of(flags)
    tp, pp, cp, vp = row["tp"], row["pp"], row["cp"], row.get("vp") or 1
    label = (
        f"{row['model'].get('name', '?')} {row['gpus']}x{row['gpu'].split('-')[0]} {row['precision']}"
        f"{'/' + row['recipe'] if row.get('recipe') else ''} TP{tp} PP{pp}{f' VP{vp}' if vp > 1 else ''}"
        f"{f' CP{cp}' if cp > 1 else ''}{' FSDP' if row.get('fsdp') else ''}"
    )
    priced = PricedRow(row["id"], source, split_of(row, held_out), row["gpu"], label, measured=0.0)
    if row.get("suspect"):
        priced.skipped = f"{row['id']}: the source's row contradicts itself ({row['suspect']})"
        return priced
    try:
        model = ModelSpec.from_dict(row["model"])
    except SpecError as exc:
        priced.skipped = f"model not fully stated ({exc.message})"
        return priced
    measured = row["measured"]
    if "tokens_per_s_per_gpu" in measured:
        priced.measured = float(measured["tokens_per_s_per_gpu"])
    else:
        flops = flops_per_token(source, model, row["seq_length"], tp, recompute == "full")
        priced.measured = measured["tflops_per_gpu"] * 1e12 / flops
        priced.notes.append("tokens/s from the source's TFLOP/s and FLOP count")
    try:
        job = job_of(row)
    except SpecError as exc:
        priced.skipped = exc.message
        return priced
    if flags.get("recompute_method") == "block":
        priced.notes.append("block recompute of a few layers priced without recompute")
    dp = row["gpus"] // (tp * pp * cp)
    zero = 3 if row.get("fsdp") else 1 if flags.get("distributed_optimizer", True) and dp * cp > 1 else 0
    if zero == 3 and pp > 1:
        zero = 1  # Megatron runs FSDP only at PP 1: a pipelined FSDP (Llama 3's) is priced with sharded optimizer
        priced.notes.append("FSDP with a pipeline priced as the distributed optimizer")
    sizes = (row["micro_batch_size"],) if row.get("micro_batch_size") else MICRO_BATCH_SIZES
    split = pipeline_split(job.model, pp * vp, flags) if pp > 1 else None
    best = None
    for mbs in sizes:
        try:
            made, pred = configure(
                job.model,
                job.cluster,
                job.training,
                job.target,
                tp,
                pp,
                mbs,
                zero,
                recompute,
                split,
                cp=cp,
                virtual_stages=vp,
                offloaded_layers=offloaded_layers_of(flags),
            )
        except SpecError as exc:
            priced.skipped = exc.message
            continue
        tokens = made.tokens_per_second / row["gpus"]
        share = max(pred.stage_memory) / pred.reserved_per_allocated / job.cluster.usable_memory_bytes
        # The fastest that fits; where none does, the leanest (the likeliest to be what ran).
        rank = (True, tokens) if pred.fits else (False, -share)
        if best is None or rank > best[0]:
            best = (rank, tokens, pred.fits, mbs, share)
    if best is not None:
        _, priced.predicted, priced.fits, priced.micro_batch_size, priced.memory_share = best
        priced.skipped = None
    return priced


def pipeline_split(model: ModelSpec, stages: int, flags: dict) -> list[int]:
    """Transformer layers per stage as Megatron splits them: evenly over the stages, the embedding and the loss
    counted as a layer each where the source says so (Megatron-Bridge's account_for_embedding_in_pipeline_split
    and account_for_loss_in_pipeline_split), earlier stages taking the remainder."""
    embedding = int(bool(flags.get("account_for_embedding_in_pipeline_split")))
    loss = int(bool(flags.get("account_for_loss_in_pipeline_split")))
    base, extra = divmod(model.num_layers + embedding + loss, stages)
    counts = [base + (i < extra) for i in range(stages)]
    counts[0] -= embedding
    counts[-1] -= loss
    return counts


@dataclass
class PlannedRow:
    """uniap's own plan for a published row's job (its GPUs, model, batch, sequence and precision), against the
    throughput the source reached with its hand-tuned configuration."""

    id: str
    gpu: str
    label: str
    measured: float
    planned: float | None = None
    configuration: str = ""
    seconds: float = 0.0
    failed: str | None = None

    @property
    def gain_percent(self) -> float | None:
        return None if self.planned is None else (self.planned / self.measured - 1.0) * 100.0


def plan_rows(time_limit: float = 120.0) -> list[PlannedRow]:
    """Plan each distinct published job (rows that share GPUs, model, batch, sequence and precision are one job:
    its best published throughput is the bar) with target megatron, nothing pinned."""
    best: dict[tuple, tuple[PricedRow, dict, str, bool]] = {}
    for source, held_out, row in load_rows():
        priced = price_row(source, held_out, row)
        if priced.predicted is None:
            continue
        key = (row["model"]["name"], row["gpu"], row["gpus"], row["global_batch_size"], row["seq_length"])
        key += (row["precision"], row.get("recipe"))
        if key not in best or priced.measured > best[key][0].measured:
            best[key] = (priced, row, source, held_out)
    out = []
    for priced, row, source, held_out in best.values():
        job = job_of(row)
        label = f"{row['model']['name']} {row['gpus']}x{row['gpu'].split('-')[0]} gbs {row['global_batch_size']}"
        label += f" seq {row['seq_length']} {row['precision']}"
        planned = PlannedRow(row["id"], row["gpu"], label, priced.measured)
        started = time.perf_counter()
        try:
            made, _ = plan(job, time_limit=time_limit, progress=False)
            planned.planned = made.tokens_per_second / row["gpus"]
            planned.configuration = short_label(made)
        except UniapError as exc:
            planned.failed = exc.message
        planned.seconds = time.perf_counter() - started
        out.append(planned)
    return out


def print_plans(rows: list[PlannedRow]) -> None:
    print("1b. planned: uniap's own Megatron plan for each published job vs the best published throughput")
    print(f"  {'job':<52} {'published':>9} {'planned':>9} {'gain':>7}  {'s':>5}  configuration")
    for r in sorted(rows, key=lambda r: (r.gpu, r.label)):
        if r.planned is None:
            print(f"  {r.label[:52]:<52} {r.measured:>9.0f} {'-':>9} {'-':>7}  {r.seconds:>5.1f}  {r.failed}")
            continue
        print(
            f"  {r.label[:52]:<52} {r.measured:>9.0f} {r.planned:>9.0f} {r.gain_percent:>+6.1f}%  {r.seconds:>5.1f}  "
            f"{r.configuration}"
        )
    below = [r for r in rows if r.planned is not None and r.planned < r.measured]
    print(f"  {len(below)} of {len(rows)} jobs planned below the published throughput\n")


def price_corpus() -> list[PricedRow]:
    return [price_row(source, held_out, row) for source, held_out, row in load_rows()]


def summary(rows: list[PricedRow]) -> dict[str, dict]:
    """Per split: rows priced, mean and worst |error|, and how many uniap says would not fit."""
    out = {}
    for split in SPLITS:
        errors = [abs(r.error_percent) for r in rows if r.split == split and r.predicted is not None]
        out[split] = {
            "rows": len(errors),
            "skipped": sum(1 for r in rows if r.split == split and r.predicted is None),
            "mean_abs_error_percent": statistics.mean(errors) if errors else None,
            "worst_abs_error_percent": max(errors) if errors else None,
            "not_fitting": sum(1 for r in rows if r.split == split and r.fits is False),
            "over_the_device": sum(1 for r in rows if r.split == split and (r.memory_share or 0) > 1),
        }
    return out


def print_table(rows: list[PricedRow]) -> None:
    print("1. published: real runs as their sources ran them (benchmarks/data/published), tokens/s per GPU")
    print("  memory: uniap's allocated peak per GPU over what the GPU leaves PyTorch (above 100 %: the run could not")
    print("  have fit, an error of the memory model; a plan of uniap keeps an estimated allocator share and 5 % free)")
    print(f"  {'split':<10} {'row':<60} {'mbs':>3} {'published':>9} {'uniap':>9} {'error':>7} {'memory':>6}")
    for r in sorted(rows, key=lambda r: (SPLITS.index(r.split), r.gpu, r.source, r.id)):
        if r.predicted is None:
            continue
        fits = "" if r.fits else "  (uniap: over the GPU)" if r.memory_share > 1 else "  (uniap: inside its margin)"
        print(
            f"  {r.split:<10} {r.label[:60]:<60} {r.micro_batch_size:>3} {r.measured:>9.0f} {r.predicted:>9.0f} "
            f"{r.error_percent:>+6.1f}% {r.memory_share * 100:>5.0f}%{fits}"
        )
    skipped: dict[str, int] = {}
    for r in rows:
        if r.predicted is None:
            skipped[r.skipped] = skipped.get(r.skipped, 0) + 1
    for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
        print(f"  not priced: {n} row(s): {reason}")
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.predicted is not None:
            precision = r.label.split()[2].split("/")[0]
            groups.setdefault((r.split, r.gpu.split("-")[0], precision), []).append(abs(r.error_percent))
    print(
        "  mean |error| by split, GPU and precision: "
        + "; ".join(
            f"{split} {gpu} {precision} {statistics.mean(e):.1f} % ({len(e)})"
            for (split, gpu, precision), e in sorted(groups.items(), key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1:]))
        )
    )
    for split, s in summary(rows).items():
        if not s["rows"]:
            continue
        target = f" (target {TARGETS[split]:.0f} %)" if split in TARGETS else ""
        print(
            f"  {split}: {s['rows']} rows, mean |error| {s['mean_abs_error_percent']:.1f} %{target}, worst "
            f"{s['worst_abs_error_percent']:.1f} % (target {WORST_TARGET:.0f} %); memory: {s['over_the_device']} "
            f"priced above the GPU, {s['not_fitting'] - s['over_the_device']} more inside the margin uniap's plans keep"
        )
    print()
