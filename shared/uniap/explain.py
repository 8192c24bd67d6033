"""`uniap explain`: why a plan is what it is, in numbers and in a picture.

The plan is priced again with the cost model (uniap.planner.price) to split each stage's time into the layers'
own kernels and the rest (tensor/context-parallel collectives, ZeRO's, gradient accumulation). The report names
the bottleneck stage, the pipeline bubble's share of the iteration, the once-per-iteration share (gradient sync
not hidden, optimizer step), the memory headroom of each pipeline rank, and the subproblems the search
compared it with (a solved one's time, a pruned one's lower bound). `plot` draws the 1F1B timeline (one row
per pipeline rank, each micro-batch's forward and backward, the transfers between ranks as gaps, the bubble
as empty space) beside each rank's memory against the device's usable memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError
from .plan import Plan
from .planner import PricedPlan, price
from .report import host_note, mfu_label
from .profile.schema import Profile

GiB = 2**30
FORWARD_SHARE = 1 / 3  # the timeline draws a micro-batch's stage time as forward 1/3, backward 2/3 (the FLOPs)
RUNNER_UPS = 3


@dataclass(frozen=True)
class RankReport:
    """One pipeline rank: its stages' time per micro-batch, of which the kernels' compute, once per iteration,
    and its memory (GiB allocated unless said: the reserved peak the allocator needs, the usable memory)."""

    rank: int
    layers: str
    time_per_microbatch: float
    compute: float
    once_per_iteration: float
    reserved_gib: float
    states_gib: float
    activations_gib: float
    transients_gib: float
    step_gib: float
    usable_gib: float


@dataclass
class Explanation:
    plan: Plan
    ranks: list[RankReport]
    boundary_time: list[float]
    bottleneck: int
    bubble_share: float
    once_share: float
    communication_share: float
    runner_ups: list[str] = field(default_factory=list)


def explain(plan: Plan, profile: Profile | None = None, priced: PricedPlan | None = None) -> Explanation:
    """The plan's numbers, priced again with the current cost model (and `profile` where given), or as `priced`
    already did (uniap.planner.load_priced)."""
    priced = priced or price(plan, profile)
    sub, prediction = priced.sub, priced.prediction
    deg = plan.pipeline_degree
    compute = [0.0] * deg
    for u, s in enumerate(priced.strategy_of):
        compute[sub.rank_of(priced.stage_of[u])] += sub.cost_of(u, s).compute_time
    p = [0.0] * deg
    g = [0.0] * deg
    for i, t in enumerate(prediction.stage_time):
        p[sub.rank_of(i)] += t
        g[sub.rank_of(i)] += prediction.stage_iteration_time[i]
    usable = prediction.memory_capacity / GiB
    ranks = []
    for r in range(deg):
        stages = [st for st in plan.stages if st.index % deg == r]
        mem = prediction.stage_breakdown[r]
        ranks.append(
            RankReport(
                rank=r,
                layers=", ".join(f"{st.first_layer}..{st.last_layer} ({st.num_layers})" for st in stages),
                time_per_microbatch=p[r],
                compute=compute[r],
                once_per_iteration=g[r],
                reserved_gib=prediction.stage_memory[r] / GiB,
                states_gib=mem.states / GiB,
                activations_gib=mem.activations / GiB,
                transients_gib=mem.transients / GiB,
                step_gib=mem.step_peak / GiB,
                usable_gib=usable,
            )
        )
    tpi = prediction.time_per_iteration
    bottleneck = max(range(deg), key=lambda r: p[r])
    busy = plan.micro_batches * p[bottleneck]
    once = max(g)
    bubble = max(0.0, tpi - busy - once)
    total_p = sum(p)
    communication = total_p - sum(compute)
    return Explanation(
        plan=plan,
        ranks=ranks,
        boundary_time=list(prediction.boundary_time),
        bottleneck=bottleneck,
        bubble_share=bubble / tpi,
        once_share=once / tpi,
        communication_share=communication / total_p if total_p else 0.0,
        runner_ups=runner_ups(plan),
    )


def runner_ups(plan: Plan) -> list[str]:
    """The best subproblems the search did not choose: solved ones by their time, pruned ones by their bound."""
    results = plan.solver.get("subproblems", []) if plan.solver else []
    best = plan.time_per_iteration
    chosen = (plan.pipeline_degree, plan.micro_batches, plan.virtual_stages)
    lines = []
    others = [
        r
        for r in results
        if (r["pipeline_degree"], r["micro_batches"], r.get("virtual_stages", 1)) != chosen
        and (r.get("time_per_iteration") or r.get("bound"))
    ]
    # Solved subproblems first (their time is known), then the pruned ones by their lower bound.
    others.sort(key=lambda r: (r.get("time_per_iteration") is None, r.get("time_per_iteration") or r.get("bound")))
    for r in others[:RUNNER_UPS]:
        name = f"PP {r['pipeline_degree']}" + (f" x{r['virtual_stages']}" if r.get("virtual_stages", 1) > 1 else "")
        name += f", {r['micro_batches']} micro-batches"
        if r.get("time_per_iteration"):
            t = r["time_per_iteration"]
            lines.append(f"{name}: {t:.4g} s/iteration, {100 * (t / best - 1):+.1f} % ({r['status']})")
        else:
            b = r["bound"]
            worse = 100 * (b / best - 1)
            lines.append(f"{name}: cannot beat it (pruned: lower bound {b:.4g} s/iteration, {worse:+.1f} %)")
    return lines


def render_explanation(e: Explanation) -> str:
    plan = e.plan
    c = plan.cluster
    lines = [
        f"{plan.model.name} on {c.num_nodes} x {c.gpus_per_node} {c.gpu_name} (target {plan.target}): "
        f"{plan.time_per_iteration:.4g} s/iteration, {plan.tokens_per_second:,.0f} tokens/s, "
        f"{mfu_label(plan)} ({plan.basis.get('compute', 'estimated')} compute)",
        f"pipeline: {plan.pipeline_degree} rank(s)"
        + (f" x {plan.virtual_stages} chunks" if plan.virtual_stages > 1 else "")
        + f", {plan.micro_batches} micro-batches of {plan.micro_batch_per_replica} sample(s) per replica, data "
        f"parallel {plan.data_parallel_size}",
        "",
        f"  {'rank':>4}  {'layers':<40} {'per micro-batch':>15} {'compute':>8} {'once/iter':>9}  "
        f"{'memory GiB: states + activations + transients (step) = reserved / usable':<40}",
    ]
    for r in e.ranks:
        share = r.compute / max(r.time_per_microbatch, 1e-12) * 100
        memory = (
            f"{r.states_gib:.1f} + {r.activations_gib:.1f} + {r.transients_gib:.1f} ({r.step_gib:.1f}) = "
            f"{r.reserved_gib:.1f} / {r.usable_gib:.1f}"
        )
        lines.append(
            f"  {r.rank:>4}  {r.layers[:40]:<40} {r.time_per_microbatch * 1e3:>12.2f} ms {share:>7.0f}% "
            f"{r.once_per_iteration * 1e3:>6.1f} ms  {memory}"
        )
    worst = min(e.ranks, key=lambda r: r.usable_gib - r.reserved_gib)
    lines += [
        "",
        f"  bottleneck: rank {e.bottleneck} ({e.ranks[e.bottleneck].time_per_microbatch * 1e3:.2f} ms per micro-batch)",
        f"  pipeline bubble (fill and drain): {e.bubble_share * 100:.1f} % of the iteration; once per iteration "
        f"(gradient sync not hidden, optimizer step): {e.once_share * 100:.1f} %",
        f"  communication and gradient accumulation: {e.communication_share * 100:.1f} % of the stages' time per "
        "micro-batch (the rest is the layers' kernels)",
        f"  memory headroom: {worst.usable_gib - worst.reserved_gib:.1f} GiB on rank {worst.rank}, the fullest",
    ]
    lines += host_note(e.plan, indent="  ") + [f"  note: {note}" for note in e.plan.notes]
    if e.runner_ups:
        lines.append("  the search's next best:")
        lines += [f"    {line}" for line in e.runner_ups]
    return "\n".join(lines)


def schedule(e: Explanation) -> list[list[tuple[str, int, float, float]]]:
    """1F1B per pipeline rank: (kind 'F'/'B', micro-batch, start, duration) in execution order, forward taking
    FORWARD_SHARE of a rank's time per micro-batch; a rank waits for its input and for the transfer. An
    interleaved plan is drawn with each rank's chunks together (its real fill and drain are 1/v of this)."""
    deg, c = len(e.ranks), e.plan.micro_batches
    fwd = [r.time_per_microbatch * FORWARD_SHARE for r in e.ranks]
    bwd = [r.time_per_microbatch - f for r, f in zip(e.ranks, fwd)]
    o = e.boundary_time + [0.0]
    order = []
    for r in range(deg):
        warm = min(deg - r - 1, c)
        ops = [("F", m) for m in range(warm)]
        f_next, b_next = warm, 0
        while b_next < c:
            if f_next < c:
                ops.append(("F", f_next))
                f_next += 1
            ops.append(("B", b_next))
            b_next += 1
        order.append(ops)
    end: dict[tuple[str, int, int], float] = {}
    out: list[list[tuple[str, int, float, float]]] = [[] for _ in range(deg)]
    position = [0] * deg
    clock = [0.0] * deg
    progressed = True
    while progressed:
        progressed = False
        for r in range(deg):
            while position[r] < len(order[r]):
                kind, m = order[r][position[r]]
                if kind == "F":
                    dep = 0.0 if r == 0 else end.get(("F", m, r - 1))
                    dep = dep if r == 0 or dep is None else dep + o[r - 1]
                else:
                    dep = end.get(("F", m, r)) if r == deg - 1 else end.get(("B", m, r + 1))
                    dep = dep if r == deg - 1 or dep is None else dep + o[r]
                if dep is None:
                    break
                start = max(clock[r], dep)
                duration = fwd[r] if kind == "F" else bwd[r]
                out[r].append((kind, m, start, duration))
                clock[r] = start + duration
                end[(kind, m, r)] = clock[r]
                position[r] += 1
                progressed = True
    return out


def plot(e: Explanation, path: str | Path) -> None:
    """The timeline and the memory bars in one figure (PNG, SVG or PDF by the file's suffix)."""
    plt = _pyplot(path)
    from matplotlib.patches import Patch

    runs = schedule(e)
    deg = len(runs)
    fig, (ax_t, ax_m) = plt.subplots(
        1, 2, figsize=(14, 1.6 + 0.55 * max(deg, 3)), gridspec_kw={"width_ratios": [3, 1]}, layout="constrained"
    )
    colors = {"F": "#4C72B0", "B": "#DD8452"}
    for r, ops in enumerate(runs):
        for kind in ("F", "B"):
            bars = [(start, duration) for k, _m, start, duration in ops if k == kind]
            edge = 0.3 if e.plan.micro_batches <= 64 else 0.0  # many micro-batches: solid blocks read better
            ax_t.broken_barh(bars, (r - 0.4, 0.8), facecolors=colors[kind], edgecolor="white", linewidth=edge)
        if e.plan.micro_batches <= 16:
            for kind, m, start, duration in ops:
                ax_t.text(start + duration / 2, r, str(m), ha="center", va="center", fontsize=7, color="white")
    end = max((s + d for ops in runs for _k, _m, s, d in ops), default=0.0)
    once = [rr.once_per_iteration for rr in e.ranks]
    ax_t.broken_barh([(end, max(once))], (-0.5, deg), facecolors="#BBBBBB", alpha=0.5)
    ax_t.axvline(e.plan.time_per_iteration, color="black", linestyle="--", linewidth=1)
    ax_t.set_yticks(range(deg), [f"rank {r}" for r in range(deg)])
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds within one iteration")
    title = (
        f"1F1B timeline: {e.plan.micro_batches} micro-batches; bubble {e.bubble_share * 100:.0f} %, "
        f"bottleneck rank {e.bottleneck}; dashed: predicted iteration"
    )
    if e.plan.virtual_stages > 1:  # the interleaved schedule's fill and drain are 1/v of what is drawn
        title += (
            f"\n(interleaved over {e.plan.virtual_stages} chunks per rank, drawn as plain 1F1B of each rank's chunks)"
        )
    ax_t.set_title(title)
    timeline_handles = [
        Patch(color=colors["F"], label="forward"),
        Patch(color=colors["B"], label="backward"),
        Patch(color="#BBBBBB", label="once per iteration (grad sync, optimizer)"),
    ]
    ranks = range(deg)
    states = [r.states_gib for r in e.ranks]
    acts = [r.activations_gib for r in e.ranks]
    trans = [r.transients_gib for r in e.ranks]
    ax_m.barh(ranks, states, color="#55A868", label="model states")
    ax_m.barh(ranks, acts, left=states, color="#8172B3", label="activations in flight")
    ax_m.barh(ranks, trans, left=[a + b for a, b in zip(states, acts)], color="#C44E52", label="transients")
    ax_m.scatter([r.reserved_gib for r in e.ranks], ranks, marker="|", s=300, color="black", label="reserved peak")
    ax_m.axvline(e.ranks[0].usable_gib, color="black", linestyle="--", linewidth=1, label="usable memory")
    ax_m.set_yticks(list(ranks), [f"rank {r}" for r in ranks])
    ax_m.invert_yaxis()
    ax_m.set_xlabel("GiB per GPU")
    ax_m.set_title("memory per GPU")
    memory_handles, _ = ax_m.get_legend_handles_labels()
    fig.legend(handles=timeline_handles + memory_handles, loc="outside lower center", ncol=8, fontsize=8, frameon=False)
    fig.suptitle(
        f"{e.plan.model.name} on {e.plan.cluster.num_gpus} x {e.plan.cluster.gpu_name}: "
        f"{e.plan.time_per_iteration:.3g} s/iteration, MFU {e.plan.mfu * 100:.0f} % (predicted)"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- uniap compare ----------------------------------------------------------------------------------


def compare_table(plans: list[Plan], names: list[str]) -> str:
    """Plans side by side: configuration, time per iteration, tokens/s, MFU, peak memory per GPU, and speed
    relative to the fastest."""
    from .report import short_label

    fastest = min(p.time_per_iteration for p in plans)
    header = ["", "target", "GPUs", "configuration", "s/iteration", "tokens/s", "MFU", "peak GiB / usable", "vs best"]
    rows = [header]
    for name, p in zip(names, plans):
        peak = max(st.memory_bytes for st in p.stages) / GiB
        fits = "" if peak <= p.memory_capacity_bytes / GiB else " (does not fit)"
        rows.append(
            [
                name,
                p.target,
                str(p.cluster.num_gpus),
                short_label(p),
                f"{p.time_per_iteration:.4g}",
                f"{p.tokens_per_second:,.0f}",
                f"{p.mfu * 100:.1f}%",
                f"{peak:.1f} / {p.memory_capacity_bytes / GiB:.1f}{fits}",
                "best" if p.time_per_iteration == fastest else f"{p.time_per_iteration / fastest:.2f}x slower",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def plot_comparison(plans: list[Plan], names: list[str], path: str | Path) -> None:
    """Time per iteration and peak memory per GPU of each plan, as bars (memory against the usable line)."""
    plt = _pyplot(path)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.5 * len(plans)), layout="constrained")
    rows = range(len(plans))
    times = [p.time_per_iteration for p in plans]
    ax_t.barh(rows, times, color="#4C72B0")
    for r, t in zip(rows, times):
        relative = "best" if t == min(times) else f"{t / min(times):.2f}x the best"
        ax_t.text(t, r, f" {t:.3g} s ({relative})", va="center", fontsize=8)
    ax_t.set_yticks(list(rows), names)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds per iteration (predicted)")
    ax_t.set_xlim(0, max(times) * 1.3)
    peaks = [max(st.memory_bytes for st in p.stages) / GiB for p in plans]
    usable = [p.memory_capacity_bytes / GiB for p in plans]
    colors = ["#55A868" if m <= u else "#C44E52" for m, u in zip(peaks, usable)]
    ax_m.barh(rows, peaks, color=colors)
    ax_m.scatter(usable, rows, marker="|", s=300, color="black", label="usable memory")
    ax_m.set_yticks(list(rows), names)
    ax_m.invert_yaxis()
    ax_m.set_xlabel("peak GiB per GPU (red: does not fit)")
    ax_m.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot(path: str | Path):
    """matplotlib's pyplot on the Agg backend, for a file of a supported kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecError("--plot needs matplotlib", "pip install 'uniap[plot]' (or matplotlib)") from None
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise SpecError(f"--plot {path}: the file must end in .png, .svg or .pdf")
    return plt
