"""Plan quality: the plan's predicted time per iteration against (a) the best configuration an exhaustive
search finds over what the target framework can express, and (b) common hand-made configurations,
all priced by the same cost model. Prints speedup ratios (config time / plan time).

(a) enumerates every pipeline degree, micro-batch count and uniform strategy (one TP degree, ZeRO
stage and recompute mode for all transformer layers, as Megatron-LM and DeepSpeed run them) and, for
each, finds the best split of the layer chain exactly: every bottleneck value a stage can take is
tried, and for each the least per-iteration maximum is found by bisection over per-stage layer counts.
It needs a chain (decoder, encoder, ViT); T5's DAG is reported as not enumerated. For target
`generic` (per-layer strategies) no enumeration is tractable: the MIQP's optimality there is what
tests/test_solver_exhaustive.py checks on small cases.

Run: python benchmarks/plan_quality.py [--cases llama2-7b,...] [--targets megatron,deepspeed,generic]
"""

from __future__ import annotations

from dataclasses import replace

import argparse
import math

import numpy as np

from uniap.cluster.spec import load_cluster
from uniap.cost.evaluate import evaluate, even_split
from uniap.cost.model import CostModel
from uniap.cost.strategy import NO_PINS, Strategy, capability_for
from uniap.cost.tables import Subproblem, build_subproblem
from uniap.errors import SpecError, UniapError
from uniap.model import TrainingSpec, build_graph, model_preset
from uniap.model.graph import TRANSFORMER_KINDS
from uniap.solver.heuristic import _closest
from uniap.solver.uop import candidate_pairs, optimize
from solve_time import CASES


def best_split_time(sub: Subproblem, choice: Strategy) -> float | None:
    """Least TPI over every split of an (embedding, L identical layers, head) chain with `choice` as
    the strategy of every layer (closest available for embedding and head); None if none fits."""
    emb_rt, main_rt, head_rt = sub.runs
    strategies = [_closest(rt.strategies, choice) for rt in sub.runs]
    if None in strategies:
        return None
    ce, cl, ch = (rt.costs[rt.strategies.index(s)] for rt, s in zip(sub.runs, strategies))
    deg, L, cap = sub.deg, main_rt.run.size, sub.memory_capacity
    if any(s.tp != strategies[1].tp for s in strategies):
        return None  # the frameworks run one TP degree
    last = deg - 1
    a, b = cl.time_per_microbatch, cl.time_per_iteration
    lo, hi, e, f = [], [], [], []
    for i in range(deg):
        infl = sub.inflight[i]
        ends = [c for c, on in ((ce, i == 0), (ch, i == last)) if on]
        base_mem = sum(c.state_bytes + infl * c.activation_bytes for c in ends)
        fsdp_ends = max([c.fsdp_transient_bytes for c in ends], default=0.0)
        with_layers = base_mem + cl.backward_transient_bytes + max(fsdp_ends, cl.fsdp_transient_bytes)
        per_layer = cl.state_bytes + infl * cl.activation_bytes
        fit = math.floor((cap * (1 + 1e-9) - with_layers) / per_layer) if per_layer > 0 else L
        fit = min(L, fit)
        zero_ok = bool(ends) and base_mem + fsdp_ends <= cap * (1 + 1e-9)
        low = 0 if bool(ends) and deg > 1 else 1
        if fit < 1:
            if not (low == 0 and zero_ok):
                return None
            fit = 0
        if low == 0 and not zero_ok:
            low = 1
        if low > fit:
            return None
        lo.append(low)
        hi.append(fit)
        e.append(sum(c.time_per_microbatch for c in ends))
        f.append(sum(c.time_per_iteration for c in ends))
    lo, hi, e, f = map(np.array, (lo, hi, e, f))
    if lo.sum() > L or hi.sum() < L:
        return None
    # The boundary tensors are the same for every split of this chain: P2P is fixed by the boundary.
    o = [sub.p2p_time(main_rt.layer, j) for j in range(deg - 1)]
    omax = max(o, default=0.0)
    p_cands = np.unique(np.concatenate([np.arange(lo[i], hi[i] + 1) * a + e[i] for i in range(deg)]))
    p_cands = p_cands[p_cands >= (lo * a + e).max() - 1e-15]
    g_cands = np.unique(np.concatenate([np.arange(lo[i], hi[i] + 1) * b + f[i] for i in range(deg)]))
    g_cands = g_cands[g_cands >= (lo * b + f).max() - 1e-15]

    def capacity(p_max: np.ndarray, g_max: np.ndarray) -> np.ndarray:
        """Most layers stages can hold with stage times <= p_max and iteration times <= g_max."""
        with np.errstate(divide="ignore", invalid="ignore"):
            by_p = np.floor((p_max[:, None] - e[None, :]) / a + 1e-9) if a > 0 else np.full((len(p_max), deg), L)
            by_g = np.floor((g_max[:, None] - f[None, :]) / b + 1e-9) if b > 0 else np.full((len(p_max), deg), L)
        n = np.minimum(np.minimum(by_p, by_g), hi[None, :])
        ok = (n >= lo[None, :]).all(axis=1)
        return np.where(ok, n.sum(axis=1), -1)

    # For every bottleneck candidate, bisect the smallest feasible per-iteration maximum.
    left = np.zeros(len(p_cands), dtype=int)
    right = np.full(len(p_cands), len(g_cands) - 1)
    feasible = capacity(p_cands, g_cands[right]) >= L
    while (left < right).any():
        mid = (left + right) // 2
        good = capacity(p_cands, g_cands[mid]) >= L
        right = np.where(good & (left < right), mid, right)
        left = np.where(~good & (left < right), mid + 1, left)
    if not feasible.any():
        return None
    total_p = L * a + e.sum()
    tpi = total_p + sum(o) + (sub.c - 1) * np.maximum(p_cands, omax) + g_cands[right]
    return float(tpi[feasible].min())


def best_expressible(graph, cluster, training, cap, cm) -> tuple[float, str] | None:
    if len(graph.runs) != 3 or any(e.kind != "chain" for e in graph.edges):
        return None
    best = None
    for deg, c, v in candidate_pairs(graph, cluster, training, cap, NO_PINS):
        if v > 1:
            continue  # the best split below is 1F1B's (one chunk per rank)
        sub = build_subproblem(graph, cluster, training, cap, cm, deg, c)
        if not sub.feasible_strategies:
            continue
        for choice in sub.runs[1].strategies:
            t = best_split_time(sub, choice)
            if t is not None and (best is None or t < best[0]):
                best = (t, f"pp{deg} c{c} {choice.label}")
    return best


def hand_made(graph, cluster, training, cap, cm, tp: int, pp: int, zero: int) -> float | None:
    """Micro-batch size 1 per replica, even split; full recompute only if needed to fit."""
    n = cluster.num_gpus
    if n % (tp * pp):
        return None
    dp = n // (tp * pp)
    if training.global_batch_size % dp:
        return None
    c = training.global_batch_size // dp
    for rc in ("none", "full"):
        try:
            sub = build_subproblem(graph, cluster, training, cap, cm, pp, c)
            strategies = [
                Strategy(tp, dp, zero if dp > 1 else 0, rc if layer.kind in TRANSFORMER_KINDS else "none")
                for layer in graph.layers
            ]
            pred = evaluate(sub, even_split(graph, pp), strategies)
        except SpecError:
            continue
        if pred.fits:
            return pred.time_per_iteration
    return None


def ratio(t: float | None, plan: float) -> str:
    return "   n/a" if t is None else f"{t / plan:6.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", help="comma-separated case names (prefix match), default all")
    ap.add_argument("--targets", default="megatron,deepspeed,generic")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.cases or any(c.name.startswith(x) for x in args.cases.split(","))]
    print("speedup of the plan = configuration's time per iteration / plan's (1.000 = as fast as the plan)\n")
    print(
        f"{'case':<18} {'target':<10} {'plan s/it':>10}  {'(a) best expressible':<36} {'ratio':>6}  "
        f"{'TPxPP':>6} {'ZeRO-3':>6} {'even':>6}"
    )
    for case in cases:
        training = TrainingSpec(global_batch_size=case.batch, seq_length=case.seq)
        model = model_preset(case.model)
        cluster = load_cluster("dgx-a100-80g", case.nodes)
        graph = build_graph(model, training)
        for target in args.targets.split(","):
            cap = capability_for(target)
            training = cap.job_training(replace(training, overlaps=None))  # as `uniap plan` resolves them
            cm = CostModel(cluster, training)
            try:
                plan = optimize(graph, cluster, training, cap, cm, progress=False).prediction.time_per_iteration
            except UniapError as exc:
                print(f"{case.name:<18} {target:<10} no plan: {exc.message}")
                continue
            found = best_expressible(graph, cluster, training, cap, cm) if target != "generic" else None
            megatron_like = hand_made(graph, cluster, training, cap, cm, cluster.gpus_per_node, cluster.num_nodes, 1)
            zero3 = hand_made(graph, cluster, training, cap, cm, 1, 1, 3)
            even = min(
                (
                    u[0].time_per_iteration
                    for d, c, v in candidate_pairs(graph, cluster, training, cap, NO_PINS)
                    if v == 1 and (u := _uniform(graph, cluster, training, cap, cm, d, c))
                ),
                default=None,
            )
            label = (
                "n/a (generic)"
                if target == "generic"
                else "n/a (DAG)"
                if found is None
                else f"{found[0]:.4f} {found[1]}"
            )
            print(
                f"{case.name:<18} {target:<10} {plan:>10.4f}  {label:<36} "
                f"{ratio(found[0] if found else None, plan)}  {ratio(megatron_like, plan)} {ratio(zero3, plan)} "
                f"{ratio(even, plan)}",
                flush=True,
            )
    print(
        "\nTPxPP: TP = GPUs per node, PP = nodes, distributed optimizer, micro-batch 1, even split; ZeRO-3: "
        "pure FSDP, micro-batch 1; even: the best uniform strategy with the even split over all (pp, c)."
    )


def _uniform(graph, cluster, training, cap, cm, deg, c):
    from uniap.solver.heuristic import best_uniform_plan

    return best_uniform_plan(build_subproblem(graph, cluster, training, cap, cm, deg, c))


if __name__ == "__main__":
    main()
