"""The cost model: time and memory of one layer under one strategy, and of collectives.

Per layer and strategy (for one stage of `tp*dp` devices and a pipeline micro-batch of `micro_batch`
samples, so each replica processes b = micro_batch/dp samples):
- time per micro-batch (the paper's A): forward + backward (+ recomputed forward) compute, TP
  collectives on the critical path, and FSDP/ZeRO-2 collectives overlapped with compute;
- time per iteration: the exposed part of the data-parallel gradient sync and the optimizer step;
- memory: model states per ZeRO stage (16 bytes/parameter with mixed-precision Adam), activations per
  in-flight micro-batch (Korthikanti et al.), and transient memory (a recomputed layer's activations,
  FSDP's gathered parameters).
Compute times come from a measured profile when it has the layer, else from FLOPs at a fraction of
peak; collective times from measured bus bandwidths, else from datasheet link bandwidths.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cluster.spec import ClusterSpec
from ..model.graph import Layer
from ..model.spec import TrainingSpec
from ..profile.schema import Profile, bus_factor
from .strategy import Strategy

MEASURED, ESTIMATED = "measured", "estimated"
OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master weights + Adam m and v (mixed precision)
OPTIMIZER_STEP_TRAFFIC = 32  # bytes of HBM traffic per parameter in an Adam step (read + write)
DEFAULT_OVERLAP = 1.15  # slowdown of overlapped compute/communication when nothing was measured


def overlapped(a: float, b: float, coefficient: float) -> float:
    """Time of two activities run concurrently: the longer one plus (coefficient-1) of the shorter
    (1 = perfect overlap, 2 = serialized), as Galvatron and UniAP model it."""
    return max(a, b) + (coefficient - 1.0) * min(a, b)


@dataclass(frozen=True)
class LayerCost:
    time_per_microbatch: float
    time_per_iteration: float
    state_bytes: float
    activation_bytes: float
    recompute_transient_bytes: float
    fsdp_transient_bytes: float
    compute_basis: str


def activation_bytes(layer: Layer, tp: int, samples: float, recompute: str, sequence_parallel: bool = True) -> float:
    """Bytes a layer keeps for backward per micro-batch on one device (Korthikanti et al. 2022).

    TP divides `act_split` and `act_scores`; only sequence parallelism also divides `act_seq`.
    Selective recompute drops the attention scores; full recompute keeps only the layer input."""
    seq_div = tp if sequence_parallel else 1
    if recompute == "full":
        return samples * layer.input_bytes / seq_div
    kept = layer.act_split / tp + layer.act_seq / seq_div
    if recompute == "none":
        kept += layer.act_scores / tp
    return samples * kept


class CostModel:
    """Costs on one cluster, from a measured profile where it has the number, else estimated."""

    def __init__(self, cluster: ClusterSpec, training: TrainingSpec, profile: Profile | None = None):
        self.cluster, self.training, self.profile = cluster, training, profile
        self.bpv = training.bytes_per_value
        measured_overlap = profile.overlap_coefficient if profile else None
        self.overlap = measured_overlap or DEFAULT_OVERLAP
        self.overlap_basis = MEASURED if measured_overlap else ESTIMATED
        self.comm_bases: set[str] = set()

    # --- collectives ------------------------------------------------------------------------------

    def bus_bandwidth(self, op: str, group: int, intra_node: bool) -> float:
        """Bytes/s: measured for this op, group size and scope if the profile has it, else datasheet."""
        scope = "intra_node" if intra_node else "inter_node"
        measured = self.profile.bus_bandwidth(op, group, scope) if self.profile else None
        if measured:
            self.comm_bases.add(MEASURED)
            return measured * 1e9
        self.comm_bases.add(ESTIMATED)
        c = self.cluster
        if intra_node:
            return c.intra_node_bandwidth_gbps * c.intra_node_efficiency * 1e9
        return c.inter_node_bandwidth_gbps * c.inter_node_efficiency * 1e9

    def collective(self, op: str, nbytes: float, group: int, intra_node: bool) -> float:
        """Seconds for a ring collective on `nbytes` (the full tensor) over `group` ranks."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        return (self.cluster.collective_latency_us * 1e-6
                + bus_factor(op, group) * nbytes / self.bus_bandwidth(op, group, intra_node))

    def p2p(self, nbytes: float, intra_node: bool) -> float:
        if nbytes <= 0:
            return 0.0
        return self.cluster.collective_latency_us * 1e-6 + nbytes / self.bus_bandwidth("p2p", 2, intra_node)

    # --- layers -----------------------------------------------------------------------------------

    def compute_times(self, layer: Layer, tp: int, samples: int) -> tuple[float, float, str]:
        """(forward, backward) seconds of one replica's micro-batch on one device, and their basis."""
        if self.profile:
            measured = self.profile.layer_times(layer.signature, tp, samples)
            if measured:
                return measured[0], measured[1], MEASURED
        c = self.cluster
        matmul = layer.flops_fwd * samples / tp / (c.peak_tflops * 1e12 * c.matmul_efficiency)
        elementwise = 2.0 * activation_bytes(layer, tp, samples, "none") / (c.hbm_bandwidth_gbps * 1e9)
        fwd = matmul + elementwise
        return fwd, 2.0 * fwd, ESTIMATED

    def layer_cost(self, layer: Layer, s: Strategy, micro_batch: int, pipeline_degree: int,
                   stage_intra_node: bool) -> LayerCost:
        """Cost of `layer` under `s` for micro-batches of `micro_batch` samples (the whole pipeline's)."""
        b = micro_batch // s.dp
        bpv, tp, dp = self.bpv, s.tp, s.dp
        fwd, bwd, basis = self.compute_times(layer, tp, b)
        if s.recompute == "full":
            compute = 2 * fwd + bwd
        elif s.recompute == "selective":
            compute = fwd + bwd + 2.0 * b * layer.act_scores / tp / (self.cluster.hbm_bandwidth_gbps * 1e9)
        else:
            compute = fwd + bwd

        tp_one_way = self.collective("all_reduce", layer.tp_comm_bytes * b, tp, True)
        tp_comm = tp_one_way * (3 if s.recompute == "full" else 2)

        # A tied weight that shares a stage with its twin (pipeline degree 1) holds no extra copy.
        params_tp = 0 if (layer.tied_weights and pipeline_degree == 1) else layer.params_tp
        params = params_tp / tp + layer.params_rep
        weight_bytes = params * bpv
        per_mb_comm, exposed_iter = 0.0, 0.0
        if dp > 1:
            ag = self.collective("all_gather", weight_bytes, dp, stage_intra_node)
            rs = self.collective("reduce_scatter", weight_bytes, dp, stage_intra_node)
            if s.zero == 3:
                per_mb_comm = 2 * ag + rs
            elif s.zero == 2:
                per_mb_comm, exposed_iter = rs, ag
            elif s.zero == 1:
                exposed_iter = overlapped(bwd, rs, self.overlap) - bwd + ag
            else:
                ar = self.collective("all_reduce", weight_bytes, dp, stage_intra_node)
                exposed_iter = overlapped(bwd, ar, self.overlap) - bwd
        opt_params = params / dp if s.zero >= 1 else params
        optimizer = opt_params * OPTIMIZER_STEP_TRAFFIC / (self.cluster.hbm_bandwidth_gbps * 1e9) if params else 0.0

        state = params * {0: 2 * bpv + OPTIMIZER_BYTES_PER_PARAM,
                          1: 2 * bpv + OPTIMIZER_BYTES_PER_PARAM / dp,
                          2: bpv + (bpv + OPTIMIZER_BYTES_PER_PARAM) / dp,
                          3: (2 * bpv + OPTIMIZER_BYTES_PER_PARAM) / dp}[s.zero]
        act = activation_bytes(layer, tp, b, s.recompute)
        # While one layer recomputes, its full activations live; FSDP holds a layer's gathered weights
        # and prefetches the next one's.
        rc_transient = {"none": 0.0, "full": activation_bytes(layer, tp, b, "none"),
                        "selective": b * layer.act_scores / tp}[s.recompute]
        fsdp_transient = 2 * weight_bytes if s.zero == 3 else 0.0
        return LayerCost(time_per_microbatch=overlapped(compute, per_mb_comm, self.overlap) + tp_comm,
                         time_per_iteration=exposed_iter + optimizer, state_bytes=state, activation_bytes=act,
                         recompute_transient_bytes=rc_transient, fsdp_transient_bytes=fsdp_transient,
                         compute_basis=basis)
