"""The MIQP of one subproblem (pipeline degree deg, micro-batch count c), in CVXPY, solved by SCIP.

Variables follow the paper, compressed over runs of identical layers (exact: layers in a run have equal
costs, so only how many of them each stage holds under each strategy matters):
- N[r][i, k]  integer, layers of run r on stage i using strategy k (the paper's P[u][i] * S[u][k]);
- Zf/Zl[r][i] binary, run r's first/last layer sits on a stage <= i (order preservation);
- Lay[r][i, l] binary, the TP degree (activation layout) of run r's layers on stage i.
Products of binaries are linearized (y >= x1 + x2 - 1), the max of the 1F1B objective becomes an
epigraph variable. With deg = 1 there is no placement and the problem is the paper's QIP. With v chunks per
pipeline rank (interleaved 1F1B) the layers are placed on deg * v stages, stage i on rank i % deg, and the
time and memory of a rank are sums over its stages (the matrix R below).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from ..cost.evaluate import evaluate
from ..cost.model import BUFFERS, FORWARD_SHARE, TRANSIENT_CLASSES
from ..cost.strategy import Strategy
from ..cost.tables import RunTable, Subproblem
from ..model.graph import TRANSFORMER_KINDS
from ..tolerances import CUTOFF_SLACK, ROUNDING

log = logging.getLogger(__name__)

DEFAULT_GAP = 1e-4
STDOUT_FD, STDERR_FD = 1, 2
# The constraint families, in the order the MIQP is built; each method of _Formulation adds one.
PLACEMENT, ORDER, STRATEGY, STAGE_TIME, COMMUNICATION, MEMORY, OBJECTIVE = (
    "placement",
    "order preservation",
    "strategy selection",
    "stage time",
    "communication time",
    "memory",
    "objective",
)
FAMILIES = (PLACEMENT, ORDER, STRATEGY, STAGE_TIME, COMMUNICATION, MEMORY, OBJECTIVE)
SCALE = 100.0  # the objective's lower bound and the memory capacity both become 100 model units


@dataclass
class SubproblemResult:
    """Outcome of one subproblem: status optimal | infeasible | time_limit | pruned | no_strategy."""

    deg: int
    c: int
    status: str
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    solve_seconds: float = 0.0
    stage_of: list[int] | None = None
    strategy_of: list[Strategy] | None = None
    v: int = 1

    @classmethod
    def of(cls, sub: Subproblem, status: str, **fields) -> "SubproblemResult":
        """The result of `sub` (its pipeline degree, micro-batch count and chunks per rank)."""
        return cls(sub.deg, sub.c, status, v=sub.v, **fields)

    def to_dict(self) -> dict:
        return {
            "pipeline_degree": self.deg,
            "virtual_stages": self.v,
            "micro_batches": self.c,
            "status": self.status,
            "time_per_iteration": self.objective,
            "bound": self.bound,
            "gap": self.gap,
            "solve_seconds": round(self.solve_seconds, 4),
        }


class _Formulation:
    """Builds the constraint families of one subproblem; each method is one family of the paper."""

    def __init__(self, sub: Subproblem, memory_limited: bool = True):
        self.sub = sub
        self.deg = sub.stages  # stages the layers are placed on (deg * v)
        # R[r, i] = 1 when stage i runs on pipeline rank r
        self.R = np.array([[1.0 if sub.rank_of(i) == r else 0.0 for i in range(sub.stages)] for r in range(sub.deg)])
        self.families: dict[str, list] = {family: [] for family in FAMILIES}  # constraints by family
        # Units: SCIP's tolerances are absolute (1e-6), and a plan's times span 1e-5..1e3 s and its
        # memory 1e3..1e11 bytes, so both are rescaled to put the numbers that matter near 100.
        bound = sub.lower_bound()
        self.time_unit = bound / SCALE if np.isfinite(bound) and bound > 0 else 1.0
        self.memory_unit = sub.memory_capacity / SCALE
        self.N = [self._counts(rt) for rt in sub.runs]
        # Without the memory limit (minimizing memory instead) a run's size is the only bound on its counts.
        self.U = [
            self._count_bounds(rt) if memory_limited else np.full((self.deg, len(rt.strategies)), float(rt.run.size))
            for rt in sub.runs
        ]
        self.C = [cp.sum(N, axis=1) for N in self.N]  # layers of run r per stage
        self.Zf, self.Zl = [], []
        self.Lay = [None] * len(sub.runs)

    def _count_bounds(self, rt: RunTable) -> np.ndarray:
        """U[i, k]: most layers of the run stage i can hold under strategy k, implied by the memory
        limit alone (states + in-flight activations, or the states at the optimizer step, of those layers).
        Tighter than the run's size, these bounds make every linking constraint below tighter in the LP
        relaxation."""
        cap = SCALE
        U = np.full((self.deg, len(rt.strategies)), float(rt.run.size))
        for i, inflight in enumerate(self.sub.inflight):
            for k, cost in enumerate(rt.costs):
                need = max(cost.state_bytes + inflight * cost.activation_bytes, cost.step_bytes) / self.memory_unit
                if need > 0:
                    U[i, k] = min(U[i, k], np.floor(cap / need + ROUNDING))
        return U

    def _counts(self, rt: RunTable) -> cp.Variable:
        shape = (self.deg, len(rt.strategies))
        if rt.run.size == 1:
            return cp.Variable(shape, boolean=True)
        return cp.Variable(shape, integer=True)

    # --- placement and order preservation --------------------------------------------------------

    @property
    def cons(self) -> list:
        """Every constraint, family by family."""
        return [c for family in FAMILIES for c in self.families[family]]

    def placement(self) -> None:
        """Every layer on exactly one stage, no stage empty (C_r[i] = sum_k N_r[i, k]), and where the split is
        fixed (Subproblem.split_counts), its transformer layers on each stage:

        0 <= N_r[i, k] <= U_r[i, k],   sum_i C_r[i] = |r|,   sum_r C_r[i] >= 1,
        fixed:  sum_(r transformer) C_r[i] = counts[i]."""
        cons = self.families[PLACEMENT]
        for rt, N, C, U in zip(self.sub.runs, self.N, self.C, self.U):
            cons += [N >= 0, N <= U, cp.sum(C) == rt.run.size]
        cons.append(sum(self.C) >= 1)
        if self.sub.split_counts is not None:
            main = [C for rt, C in zip(self.sub.runs, self.C) if rt.layer.kind in TRANSFORMER_KINDS]
            cons.append(sum(main) == np.array(self.sub.split_counts, dtype=float))

    def order_preserving(self) -> None:
        """A layer's stage never exceeds its successors' (contiguous stages on the DAG). With F_r[i] the
        layers of run r on stages <= i, binaries Zf_r[i] (its first layer is on a stage <= i) and Zl_r[i]
        (its last one is):

            Zf_r[i] <= F_r[i] <= |r| Zf_r[i],   |r| Zl_r[i] <= F_r[i] <= |r| - 1 + Zl_r[i],
            Z[i] <= Z[i+1] (cumulative),   Zl_a[i] >= Zf_b[i] for every edge a -> b between runs."""
        cons = self.families[ORDER]
        one = np.ones(1)
        for rt, C in zip(self.sub.runs, self.C):
            n = rt.run.size
            if self.deg == 1:
                self.Zf.append(cp.Constant(one))
                self.Zl.append(cp.Constant(one))
                continue
            F = cp.cumsum(C)[: self.deg - 1]  # layers of the run on stages <= i
            if n == 1:
                zf = zl = F
            else:
                zf = cp.Variable(self.deg - 1, boolean=True)
                zl = cp.Variable(self.deg - 1, boolean=True)
                cons += [F >= zf, F <= n * zf, F >= n * zl, F <= n - 1 + zl]
                if self.deg > 2:
                    cons += [zf[1:] >= zf[:-1], zl[1:] >= zl[:-1]]
            self.Zf.append(cp.hstack([zf, one]))
            self.Zl.append(cp.hstack([zl, one]))
        for a, succ in self.sub.run_successors.items():
            for b, _kind in succ:
                cons.append(self.Zl[a][:-1] >= self.Zf[b][:-1])

    # --- strategy selection ----------------------------------------------------------------------

    def strategy_selection(self) -> None:
        """One TP degree (activation layout) per run and stage, Lay_r[i, l] binary, and the capability's
        framework-wide ties as shared one-hots g:

            sum_l Lay_r[i, l] = 1,   N_r[i, k] <= U_r[i, k] Lay_r[i, tp(k)],
            CP, and uniform TP / ZeRO / recompute: sum_v g_v = 1,   N_r[i, k] <= U_r[i, k] g_{value(k)}."""
        cons = self.families[STRATEGY]
        cap, runs, deg = self.sub.capability, self.sub.runs, self.deg
        ones = np.ones((deg, 1))
        if cap.uniform_tp:
            tps = sorted({tp for rt in runs for tp in rt.layouts})
            g_tp = cp.Variable(len(tps), boolean=True)
            cons.append(cp.sum(g_tp) == 1)
        for r, (rt, N) in enumerate(zip(runs, self.N)):
            L = rt.layouts
            if len(L) == 1 and not cap.uniform_tp:
                continue
            to_strat = np.array([[1.0 if s.tp == tp else 0.0 for s in rt.strategies] for tp in L])
            if cap.uniform_tp:
                idx = [tps.index(tp) for tp in L]
                chosen = g_tp[idx]
                cons.append(cp.sum(chosen) == 1)
                lay = ones @ cp.reshape(chosen, (1, len(L)), order="C")
            else:
                lay = cp.Variable((deg, len(L)), boolean=True)
                cons.append(cp.sum(lay, axis=1) == 1)
            self.Lay[r] = lay
            cons.append(N <= cp.multiply(self.U[r], lay @ to_strat))
        self._tie(lambda s: s.cp, lambda rt, s: True)  # one CP degree for the model, on every target
        if cap.uniform_zero:
            # Every layer, one replica or many: with one, offloading still applies to all or none of them.
            self._tie(lambda s: s.zero_variant, lambda rt, s: True)
        if cap.uniform_recompute:
            self._tie(lambda s: s.recompute, lambda rt, s: rt.layer.kind in TRANSFORMER_KINDS)
        self._activation_offload()

    def _activation_offload(self) -> None:
        """Activations go to host memory for fewer transformer layers than the model has (L), or for exactly
        the pinned count P, with O the offloaded layers over every run, stage and offloading strategy k:

            O = sum_r sum_i sum_(k offloads) N_r[i, k] <= L - 1,   pinned:  O = P."""
        offloaded = [
            cp.sum(N[:, [k for k, s in enumerate(rt.strategies) if s.offload_activations]])
            for rt, N in zip(self.sub.runs, self.N)
            if any(s.offload_activations for s in rt.strategies)
        ]
        if not offloaded:
            return
        cons = self.families[STRATEGY]
        layers = sum(rt.run.size for rt in self.sub.runs if rt.layer.kind in TRANSFORMER_KINDS)
        cons.append(sum(offloaded) <= layers - 1)
        if self.sub.offloaded_layers is not None:
            cons.append(sum(offloaded) == self.sub.offloaded_layers)

    def _tie(self, value, applies) -> None:
        """One value of `value(strategy)` for every (run, strategy) where `applies`."""
        values = sorted({value(s) for rt in self.sub.runs for s in rt.strategies if applies(rt, s)})
        if len(values) <= 1:
            return
        g = cp.Variable(len(values), boolean=True)
        cons = self.families[STRATEGY]
        cons.append(cp.sum(g) == 1)
        ones = np.ones((self.deg, 1))
        for rt, N, U in zip(self.sub.runs, self.N, self.U):
            cols = [k for k, s in enumerate(rt.strategies) if applies(rt, s)]
            if not cols:
                continue
            pick = np.zeros((len(values), len(cols)))
            for j, k in enumerate(cols):
                pick[values.index(value(rt.strategies[k])), j] = 1.0
            allowed = ones @ cp.reshape(g @ pick, (1, len(cols)), order="C")
            cons.append(N[:, cols] <= cp.multiply(U[:, cols], allowed))

    # --- costs -----------------------------------------------------------------------------------

    def _layout_col(self, r: int, tp: int):
        lay = self.Lay[r]
        if lay is None:  # a single layout
            return np.ones(self.deg)
        return lay[:, self.sub.runs[r].layouts.index(tp)]

    def _per_stage(self, cost: str, unit: float) -> cp.Expression:
        """sum_r N_r[i] . cost_r per stage i: a LayerCost field of every layer placed there, in `unit`s."""
        return sum(N @ np.array([getattr(c, cost) / unit for c in rt.costs]) for rt, N in zip(self.sub.runs, self.N))

    @staticmethod
    def _on_stage(Z) -> cp.Expression:
        """Indicator per stage from a cumulative indicator Z (1 from some stage on)."""
        return Z - cp.hstack([np.zeros(1), Z[:-1]])

    def stage_time(self) -> cp.Expression:
        """p_i: the layers' time per micro-batch, the wait for offloaded activations e_i (`offload_exposed`, with
        C_i the stage's copy time and F_i its kernels' time) and resharding between runs on the stage,

            p_i = sum_r N_r[i] . A_r + e_i + sum_(a,b) t_ab[i],
            e_i >= 0,   e_i >= C_i - F_i / 3,   e_i >= 2 C_i - F_i,
            t_ab[i] >= R_ab(la, lb) (last_a[i] + first_b[i] + Lay_a[i, la] + Lay_b[i, lb] - 3),
        the linearized product of four binaries (run a ends and run b starts on stage i in those layouts)."""
        tu = self.time_unit
        p = self._per_stage("time_per_microbatch", tu)
        if any(c.host_copy_time for rt in self.sub.runs for c in rt.costs):
            copy, kernels = self._per_stage("host_copy_time", tu), self._per_stage("compute_time", tu)
            e = cp.Variable(self.deg, nonneg=True)
            self.families[STAGE_TIME] += [e >= copy - FORWARD_SHARE * kernels, e >= 2 * copy - kernels]
            p = p + e
        for a, b in self.sub.chain_run_edges:
            ra, rb = self.sub.runs[a], self.sub.runs[b]
            pairs = [(la, lb, self.sub.reshard_time(ra.layer, la, lb) / tu) for la in ra.layouts for lb in rb.layouts]
            pairs = [x for x in pairs if x[2] > 0]
            if not pairs or self.sub.capability.uniform_tp:
                continue
            t = cp.Variable(self.deg, nonneg=True)
            both = self._on_stage(self.Zl[a]) + self._on_stage(self.Zf[b])
            for la, lb, cost in pairs:
                self.families[STAGE_TIME].append(
                    t >= cost * (both + self._layout_col(a, la) + self._layout_col(b, lb) - 3)
                )
            p = p + t
        return p

    def communication_time(self) -> cp.Expression | None:
        """o_j: P2P of every tensor crossing boundary j (a layer on a stage <= j feeding one > j),

            o_j = sum_r R'_r[j] ((Zf_r[j] - Zl_r[j]) + x_r[j]),   x_r[j] >= Zl_r[j] - Z_b[j] for each consumer b
        (Z_b = Zf_b for a chain edge, Zl_b for a skip edge: the last consumer decides)."""
        if self.deg == 1:
            return None
        sub, deg = self.sub, self.deg
        o = 0
        for r, rt in enumerate(sub.runs):
            cost = np.array([sub.p2p_time(rt.layer, j) / self.time_unit for j in range(deg - 1)])
            if not cost.any():
                continue
            if rt.run.size > 1:  # the run itself spans the boundary
                o = o + cp.multiply(cost, self.Zf[r][:-1] - self.Zl[r][:-1])
            if r in sub.run_successors:
                x = cp.Variable(deg - 1, nonneg=True)
                for b, kind in sub.run_successors[r]:
                    consumer = self.Zf[b] if kind == "chain" else self.Zl[b]
                    self.families[COMMUNICATION].append(x >= self.Zl[r][:-1] - consumer[:-1])
                o = o + cp.multiply(cost, x)
        return o

    def iteration_time(self) -> cp.Expression:
        """g_i: once-per-iteration time of each stage (exposed gradient sync, optimizer step)."""
        tu = self.time_unit
        return self._per_stage("time_per_iteration", tu)

    def memory(self, limit) -> None:
        """Allocated bytes per GPU of every pipeline rank q (the stages i on it: R[q, i] = 1), in both phases of
        an iteration, within `limit`:

            training: sum_i R[q, i] (sum_r N_r[i] . state_r + inflight_i N_r[i] . act_r) + sum_classes peak_class[q]
            step:     sum_i R[q, i] sum_r N_r[i] . step_r + peak_buffers[q]
            host:     sum_i R[q, i] sum_r N_r[i] . host_r <= host capacity per GPU   (offloaded states and activations)

        A transient class's peak is the largest among the rank's layers (peak[q] >= value * used[i] for its
        stages i, with the binary `used` forced to 1 by any layer whose strategy has that value: N <= U * used)."""
        sub, deg, cons = self.sub, self.deg, self.families[MEMORY]
        inflight = np.array(sub.inflight, dtype=float)
        training, step, host = 0, 0, []
        mu = self.memory_unit
        peaks = {name: cp.Variable(sub.deg, nonneg=True) for name in TRANSIENT_CLASSES}
        used_classes: set[str] = set()
        for rt, N, U in zip(sub.runs, self.N, self.U):
            state = N @ np.array([c.state_bytes / mu for c in rt.costs])
            training = (
                training + state + cp.multiply(inflight, N @ np.array([c.activation_bytes / mu for c in rt.costs]))
            )
            step = step + N @ np.array([c.step_bytes / mu for c in rt.costs])
            if any(c.host_bytes for c in rt.costs):
                host.append(N @ np.array([c.host_bytes / mu for c in rt.costs]))
            for name in TRANSIENT_CLASSES:
                by_value: dict[float, list[int]] = {}
                for k, cost in enumerate(rt.costs):
                    if getattr(cost, name) > 0:
                        by_value.setdefault(getattr(cost, name), []).append(k)
                for value, cols in by_value.items():
                    used = cp.Variable(deg, boolean=True)
                    cons.append(N[:, cols] <= cp.multiply(U[:, cols], used[:, None] @ np.ones((1, len(cols)))))
                    cons.append(self.R.T @ peaks[name] >= value / mu * used)
                    used_classes.add(name)
        training, step = self.R @ training, self.R @ step
        for name in used_classes:
            training = training + peaks[name]
        if BUFFERS in used_classes:
            step = step + peaks[BUFFERS]
        cons += [training <= limit, step <= limit]
        if host:
            cons.append(self.R @ sum(host) <= sub.host_capacity / mu)

    def objective(self) -> cp.Expression:
        """The paper's TPI = sum p + sum o + (c - 1) max(p, o) + max g; interleaved (v > 1), with P = R p and
        G = R g the ranks' sums over their stages, TPI = c max(P, o) + (deg - 1) max p + sum o + max G
        (uniap.cost.evaluate.Prediction). The maxima are epigraph variables:

        gmax >= G_q,   bottleneck >= P_q,   bottleneck >= o_j,   chunk >= p_i."""
        cons = self.families[OBJECTIVE]
        sub = self.sub
        p = self.stage_time()
        o = self.communication_time()
        g = self.iteration_time()
        gmax = cp.Variable(nonneg=True)
        cons.append(gmax >= self.R @ g)
        total = gmax + (cp.sum(o) if o is not None else 0)
        if sub.v > 1:
            chunk = cp.Variable(nonneg=True)
            cons.append(chunk >= p)
            total = total + (sub.deg - 1) * chunk
        else:
            total = total + cp.sum(p)
        weight = sub.c if sub.v > 1 else sub.c - 1
        if weight > 0:
            bottleneck = cp.Variable(nonneg=True)
            cons.append(bottleneck >= self.R @ p)
            if o is not None:
                cons.append(bottleneck >= o)
            total = total + weight * bottleneck
        return total

    def build(self, minimize_memory: bool = False, cutoff: float | None = None) -> cp.Problem:
        """The MIQP; with `minimize_memory` the same feasible set without the memory limit, minimizing
        the fullest stage's memory (how much a plan would need: the infeasibility report). A `cutoff`
        (seconds per iteration) admits only plans at least as fast: SCIP can then discard the whole
        subproblem as soon as its bound exceeds it."""
        self.placement()
        self.order_preserving()
        self.strategy_selection()
        if minimize_memory:
            peak = cp.Variable(nonneg=True)
            self.memory(limit=peak)
            return cp.Problem(cp.Minimize(peak), self.cons)
        self.memory(limit=SCALE)
        objective = self.objective()
        if cutoff is not None:
            self.families[OBJECTIVE].append(objective <= cutoff / self.time_unit * (1 + CUTOFF_SLACK))
        return cp.Problem(cp.Minimize(objective), self.cons)

    def extract(self) -> tuple[list[int], list[Strategy]]:
        """Per-layer stage and strategy from the counts (any order within a run's stage piece)."""
        n_layers = len(self.sub.graph.layers)
        stage_of, strategy_of = [0] * n_layers, [None] * n_layers
        for rt, N in zip(self.sub.runs, self.N):
            counts = np.rint(N.value).astype(int)
            u = rt.run.first
            for i in range(self.deg):
                for k, s in enumerate(rt.strategies):
                    for _ in range(counts[i, k]):
                        stage_of[u], strategy_of[u] = i, s
                        u += 1
        return stage_of, strategy_of


def _solve(problem: cp.Problem, time_limit: float | None, gap: float) -> bool:
    """Solve with SCIP; False when it stopped at `time_limit` with no solution (CVXPY cannot read back a
    time-limited SCIP that found none and raises SolverError; without a time limit that error is a bug)."""
    # SCIP does not catch Ctrl-C itself (it would end the solve as an error and print to stdout): Python's
    # KeyboardInterrupt follows when this subproblem's solve returns.
    params = {"limits/gap": gap, "display/verblevel": 0, "misc/catchctrlc": False}
    if time_limit is not None:
        params["limits/time"] = max(0.1, float(time_limit))
    with warnings.catch_warnings(), _stdout_to_stderr():
        # CVXPY flags SCIP's "gap limit reached" as inaccurate; the gap is reported by us instead.
        warnings.simplefilter("ignore", UserWarning)
        try:
            problem.solve(solver=cp.SCIP, scip_params=params)
        except cp.error.SolverError:
            if time_limit is None:
                raise
            return False
    return True


@contextmanager
def _stdout_to_stderr():
    """Whatever the solver's C code prints goes to stderr: stdout carries only the plan (`--json`)."""
    sys.stdout.flush()
    saved = os.dup(STDOUT_FD)
    try:
        os.dup2(STDERR_FD, STDOUT_FD)
        yield
    finally:
        os.dup2(saved, STDOUT_FD)
        os.close(saved)


def least_memory_needed(sub: Subproblem, time_limit: float | None = None) -> float | None:
    """Bytes per device the allocator reserves on the fullest stage in the leanest plan of this subproblem
    (None if the subproblem has no plan at all, or the solver ran out of time)."""
    if not sub.feasible_strategies or sub.stages > len(sub.graph.layers):
        return None
    form = _Formulation(sub, memory_limited=False)
    problem = form.build(minimize_memory=True)
    if not _solve(problem, time_limit, DEFAULT_GAP):
        return None
    if problem.value is None or not np.isfinite(problem.value):
        return None
    return float(problem.value) * form.memory_unit * sub.cost_model.reserved_per_allocated


def solve_subproblem(
    sub: Subproblem, time_limit: float | None = None, gap: float = DEFAULT_GAP, cutoff: float | None = None
) -> SubproblemResult:
    """Solve one subproblem to proven optimality (relative gap <= `gap`) or to the time limit. With a
    `cutoff`, a subproblem without a plan at least that fast comes back 'pruned'."""
    start = time.perf_counter()
    if not sub.feasible_strategies:
        return SubproblemResult.of(sub, "no_strategy", solve_seconds=time.perf_counter() - start)
    if sub.stages > len(sub.graph.layers):
        return SubproblemResult.of(sub, "infeasible", solve_seconds=time.perf_counter() - start)
    form = _Formulation(sub)
    problem = form.build(cutoff=cutoff)
    if not _solve(problem, time_limit, gap):
        return SubproblemResult.of(sub, "time_limit", solve_seconds=time.perf_counter() - start)
    model = problem.solver_stats.extra_stats.get("model") if problem.solver_stats.extra_stats else None
    elapsed = time.perf_counter() - start
    scip_status = model.getStatus() if model is not None else problem.status
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        if cutoff is not None:
            return SubproblemResult.of(sub, "pruned", bound=cutoff, solve_seconds=elapsed)
        return SubproblemResult.of(sub, "infeasible", solve_seconds=elapsed)
    if problem.value is None or not np.isfinite(problem.value) or form.N[0].value is None:
        status = "time_limit" if scip_status in ("timelimit", "userinterrupt") else "infeasible"
        return SubproblemResult.of(sub, status, solve_seconds=elapsed)
    stage_of, strategy_of = form.extract()
    status = "optimal" if scip_status == "optimal" or (model and model.getGap() <= gap) else "time_limit"
    # The plan's exact price; the MIQP's value exceeds it only by slack in auxiliary variables.
    objective = evaluate(sub, stage_of, strategy_of).time_per_iteration
    bound = min(objective, float(model.getDualbound()) * form.time_unit) if model else None
    return SubproblemResult.of(
        sub,
        status,
        objective=objective,
        bound=bound,
        gap=float(model.getGap()) if model else None,
        solve_seconds=elapsed,
        stage_of=stage_of,
        strategy_of=strategy_of,
    )
