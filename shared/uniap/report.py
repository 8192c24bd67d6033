"""Human-readable summaries of plans and predictions (the CLI's table)."""

from __future__ import annotations

from collections import Counter

from .cost.strategy import ACTIVATION_OFFLOAD_SUFFIX, RECOMPUTE_SUFFIX
from .model.graph import TRANSFORMER_KINDS
from .plan import Plan
from .profile.schema import Calibration

GiB = 2**30
# How the table names each pin (Pins fields), in the terms Megatron-LM and DeepSpeed users know.
PIN_WORDS = {
    "tp": "TP",
    "cp": "CP",
    "pipeline_degree": "PP",
    "virtual_stages": "chunks per rank",
    "even_split": "even split",
    "zero": "ZeRO",
    "recompute": "recompute",
    "micro_batch_per_replica": "micro-batch size",
    "micro_batches": "micro-batches",
    "offload": "offload",
    "offloaded_layers": "layers with activations offloaded",
}


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.3f} s"


def describe_stage(plan: Plan, stage: int) -> str:
    counts = Counter(lp.strategy.label for lp in plan.layers if lp.stage == stage and lp.kind in TRANSFORMER_KINDS)
    others = Counter(lp.strategy.label for lp in plan.layers if lp.stage == stage and lp.kind not in TRANSFORMER_KINDS)
    text = ", ".join(f"{n}x {label}" for label, n in counts.most_common())
    if others:
        text += ("; " if text else "") + "other: " + ", ".join(f"{label}" for label in others)
    return text


def plural(n: int, noun: str) -> str:
    """'1 micro-batch', '2 micro-batches', '3 stages'."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("ch", "sh", "s", "x")) else f"{n} {noun}s"


def short_label(plan: Plan) -> str:
    """The configuration in one line, e.g. 'TP4 CP1 PP16 DP2 ZeRO-1 +rc mbs 2 x384', 'TP1 CP1 PP1 DP64 FSDP
    +act-offload 40 mbs 2 x2' (a per-layer plan: its first transformer layer's strategy, marked 'mixed')."""
    s = plan.uniform_strategy
    mixed = "" if s is not None else " mixed"
    s = s or next((lp.strategy for lp in plan.layers if lp.kind in TRANSFORMER_KINDS), plan.layers[0].strategy)
    pp = f"PP{plan.pipeline_degree}" + (f"x{plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    zero = f" {s.zero_label}" if s.zero else ""
    batch = f"mbs {plan.micro_batch_per_replica} x{plan.micro_batches}"
    offload = f"{ACTIVATION_OFFLOAD_SUFFIX} {plan.offloaded_layers}" if plan.offloaded_layers else ""
    return f"TP{s.tp} CP{s.cp} {pp} DP{s.dp}{zero}{RECOMPUTE_SUFFIX[s.recompute]}{offload}{mixed} {batch}"


def batch_line(plan: Plan) -> str:
    """The batch as Megatron-LM and DeepSpeed name it: per-replica micro-batch size, data-parallel size and
    micro-batches per iteration (Megatron's number of micro-batches, DeepSpeed's gradient_accumulation_steps)."""
    head = f"pipeline degree {plan.pipeline_degree}, {plan.devices_per_stage} GPUs per stage"
    if plan.virtual_stages > 1:
        head += (
            f", {plan.virtual_stages} model chunks per rank interleaved (stage i on rank i mod {plan.pipeline_degree})"
        )
    steps = plural(plan.micro_batches, "micro-batch")
    if plan.uniform_strategy is None:  # layers differ in data-parallel size (generic target)
        return f"{head}; {steps} of {plan.micro_batch_all_replicas} samples over all replicas per iteration"
    cp = f", context-parallel size {plan.context_parallel_size}" if plan.context_parallel_size > 1 else ""
    return (
        f"{head}, data-parallel size {plan.data_parallel_size}{cp}; micro-batch size {plan.micro_batch_per_replica} "
        f"per replica x {steps} per iteration (accumulation steps)"
    )


def _memory_note(plan: Plan) -> list[str]:
    """What the fullest stage's memory is made of (plans of format 2 carry the breakdown)."""
    full = max(plan.stages, key=lambda s: s.memory_bytes)
    if full.states_bytes is None or plan.reserved_per_allocated is None:
        return []
    return [
        f"  memory of stage {full.index}, GiB per GPU: {full.states_bytes / GiB:.1f} model states + "
        f"{full.activation_bytes / GiB:.1f} activations + {full.transient_bytes / GiB:.1f} peaks while computing,",
        f"    {full.step_bytes / GiB:.1f} at the optimizer step; reserved = the larger phase x"
        f"{plan.reserved_per_allocated:.3g} (allocator), of {plan.memory_capacity_bytes / GiB:.1f} usable",
    ] + host_note(plan)


def host_note(plan: Plan, indent: str = "    ") -> list[str]:
    """Host memory the offloaded states and activations take per GPU, against what the cluster's hosts allow."""
    host = max((s.host_bytes or 0.0 for s in plan.stages), default=0.0)
    capacity = plan.cluster.host_memory_per_gpu_bytes
    if not host or capacity is None:
        return []
    what = "host memory per GPU (offloaded states and activations)"
    return [f"{indent}{what}: {host / GiB:.1f} GiB of {capacity / GiB:.1f} usable"]


def scale_warning(plan: Plan) -> str | None:
    """A warning when the cluster is larger than the batch can use: each data-parallel replica (a pipeline of
    TP x CP x PP GPUs) gets fewer samples per iteration than it has pipeline stages, so its pipeline never
    fills and bubbles dominate (the MFU says so). A batch below the GPU count is normal where replicas are few
    (TP8 PP16 on 8,192 GPUs with a batch of 2,048: 64 replicas of 32 samples)."""
    replicas, batch, stages = plan.data_parallel_size, plan.training.global_batch_size, plan.pipeline_degree
    per_replica = batch / replicas
    if per_replica >= stages:
        return None
    return (
        f"each of the {replicas} data-parallel replicas computes {per_replica:.2g} samples per iteration, fewer "
        f"than its {stages} pipeline stages: the pipeline never fills and the best plan reaches MFU "
        f"{plan.mfu * 100:.1f}%; a larger --global-batch-size or fewer --nodes would use the GPUs better"
    )


def precision_label(t) -> str:
    """'bf16', or 'bf16 + FP8 tensorwise (hybrid)' / 'bf16 + FP4 nvfp4' where the linear GEMMs run quantized."""
    if t.fp8:
        return f"{t.precision} + FP8 {t.fp8_recipe} ({t.fp8_format})"
    return t.precision + (f" + FP4 {t.fp4_recipe}" if t.fp4_recipe else "")


def mfu_label(plan: Plan) -> str:
    """MFU against the peak it is stated against: the dense bf16/fp16 peak, and under FP8 also the FP8 peak."""
    text = f"MFU {plan.mfu * 100:.1f}% of the {plan.cluster.peak_tflops:,.0f} TFLOP/s {plan.training.precision} peak"
    c, t = plan.cluster, plan.training
    peak = c.peak_fp8_tflops if t.fp8 else c.peak_fp4_tflops if t.fp4_recipe else None
    if peak:
        text += f" ({plan.mfu * c.peak_tflops / peak * 100:.1f}% of the {peak:,.0f} {t.quantized.upper()} peak)"
    return text


def render(plan: Plan, title: str) -> str:
    m, c, t = plan.model, plan.cluster, plan.training
    lines = [
        f"{title}: {m.name} on {c.name} ({c.num_nodes} x {c.gpus_per_node} {c.gpu_name}), "
        f"global batch {t.global_batch_size}, seq {t.seq_length}, {precision_label(t)}, target {plan.target}",
        "  " + batch_line(plan),
        f"  predicted: {plan.time_per_iteration:.3f} s/iteration, {plan.samples_per_second:.2f} samples/s, "
        f"{plan.tokens_per_second:,.0f} tokens/s, {mfu_label(plan)}",
        "  basis: " + ", ".join(f"{k} {v}" for k, v in plan.basis.items()),
    ]
    spans = [f"{s.first_layer}..{s.last_layer} ({s.num_layers})" for s in plan.stages]
    width = max(len("layers"), *map(len, spans))  # the column fits the longest layer names
    lines += ["", f"  {'stage':>5}  {'layers':<{width}} {'time/micro-batch':>16}  {'memory (GiB)':>14}  strategies"]
    cap = plan.memory_capacity_bytes / GiB
    for s, span in zip(plan.stages, spans):
        # Interleaved: the rank a chunk runs on, whose memory the row shows.
        stage = f"{s.index}/r{s.index % plan.pipeline_degree}" if plan.virtual_stages > 1 else str(s.index)
        lines.append(
            f"  {stage:>5}  {span:<{width}} {_seconds(s.time_per_microbatch):>16}  "
            f"{s.memory_bytes / GiB:>6.1f} / {cap:<5.1f}  {describe_stage(plan, s.index)}"
        )
    lines += _memory_note(plan)
    lines += [f"  note: {note}" for note in plan.notes]
    if plan.solver:
        sv = plan.solver
        counts = ", ".join(f"{n} {k}" for k, n in sorted(sv.get("subproblem_counts", {}).items()))
        lines += [
            "",
            f"  solver: {sv['status']} (gap {sv['gap'] * 100:.3f}%), {len(sv.get('subproblems', []))} "
            f"subproblems ({counts}), {sv['seconds']:.2f} s",
        ]
    pinned = plan.pins.to_dict()
    if pinned:
        lines.append("  pinned: " + ", ".join(f"{PIN_WORDS[k]} {v}" for k, v in pinned.items()))
    return "\n".join(lines)


def _error(predicted: float | None, measured: float | None) -> str:
    if predicted is None or not measured:
        return "-"
    return f"{(predicted / measured - 1) * 100:+.1f}%"


def render_calibration(calibration: Calibration, output: str | None) -> str:
    """Per run: measured vs predicted time and peak memory, before and after the fit; the coefficients."""
    lines = [
        f"uniap calibrate: compute scale {calibration.compute_scale:.4f}, reserved/allocated "
        + (
            f"{calibration.reserved_per_allocated:.4f}"
            if calibration.reserved_per_allocated
            else "not fitted (no memory in the logs)"
        ),
        "",
        f"  {'run':<28} {'measured s/it':>13} {'before':>8} {'after':>8}   {'measured GiB':>12} {'before':>8} "
        f"{'after':>8}",
    ]
    for r in calibration.runs:
        peak = f"{r.measured_peak_bytes / GiB:.2f} {r.memory_kind[:3]}" if r.measured_peak_bytes else "-"
        lines.append(
            f"  {r.label[:28]:<28} {r.measured_time_s:>13.4f} "
            f"{_error(r.predicted_time_s, r.measured_time_s):>8} "
            f"{_error(r.fitted_time_s, r.measured_time_s):>8}   {peak:>12} "
            f"{_error(r.predicted_peak_bytes, r.measured_peak_bytes):>8} "
            f"{_error(r.fitted_peak_bytes, r.measured_peak_bytes):>8}"
        )
    lines.append("  (before/after: prediction error vs the measurement, before and after the fit)")
    if output:
        lines.append(f"\n  profile written to {output}; plan with --profile {output}")
    return "\n".join(lines)
