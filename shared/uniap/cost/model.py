"""The cost model: time and memory of one layer under one strategy, and of collectives.

Per layer and strategy (for one stage of `tp*cp*dp` devices and a pipeline micro-batch of
`micro_batch_all_replicas` samples, so each replica processes b = micro_batch_all_replicas/dp samples,
and each of its cp context-parallel ranks 1/cp of their tokens: b/cp samples' worth of work, attention
included, since Megatron balances the causal mask over the ranks):
- time per micro-batch (the paper's A): forward + backward (+ recomputed forward) compute, TP
  collectives on the critical path, CP's ring exchange of keys and values overlapped with the attention,
  FSDP/ZeRO-2 collectives overlapped with compute, and adding the micro-batch's gradients into the
  framework's gradient buffer;
- time per iteration: the exposed part of the data-parallel gradient sync and the optimizer step;
- memory, as the target framework allocates it (its `Accounting`): model states, activations per
  in-flight micro-batch (measured by a profiler where it has the layer, else Korthikanti et al.), and
  the peaks on top of them (a recomputed layer's activations, FSDP's gathered parameters,
  communication buckets, the optimizer step's temporaries).
Compute times come from a measured profile when it has the layer, else from FLOPs and memory traffic at
the fractions of peak measured for the GPU model (uniap.cluster.devices); collective times from measured
bus bandwidths, else from datasheet link bandwidths. A profile's calibration (fitted to whole
iterations, `uniap calibrate`) scales compute time and turns allocated into reserved memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cluster.spec import ClusterSpec
from ..errors import SpecError
from ..model.graph import NVFP4_BYTES, TRANSFORMER_KINDS, Layer
from ..model.spec import FP4, FP8, MXFP8, PARAM_GATHER_OVERLAP, TP_COMM_OVERLAP, TrainingSpec
from ..profile.schema import Profile, bus_factor
from .accounting import FP32_BYTES, Accounting, PerParam, precision_aware_saving
from .strategy import OFFLOAD_NONE, Strategy

MEASURED, ESTIMATED, CALIBRATED = "measured", "estimated", "calibrated"
DEFAULT_OVERLAP = 1.15  # slowdown of overlapped compute/communication when nothing was measured
# PyTorch's caching allocator keeps freed blocks for reuse, so at the peak the memory it has reserved from
# the GPU (what runs out) exceeds what tensors occupy. 5 % is an estimate, not a measurement; a profile's
# calibration replaces it with the ratio fitted to measured peaks (`uniap calibrate`).
DEFAULT_RESERVED_PER_ALLOCATED = 1.05
# While that ratio is an estimate, a plan keeps this share of the usable memory free: the whole iterations
# measured on an H200 (benchmarks/RESULTS.md, section 3) reserved up to 4 % more than predicted, and a plan at
# 95 % of memory on an estimated ratio is an out-of-memory risk. A calibrated ratio needs no margin.
ESTIMATED_MEMORY_MARGIN = 0.05
# A flash kernel's backward recomputes the attention scores: 2.5x the forward's FLOPs instead of 2x.
FLASH_BACKWARD_FLOPS = 2.5
# A GEMM dimension cuBLAS's tensor-core kernels run fastest on is a multiple of 16 bytes (8 bf16/fp16 values);
# other sizes fall back to slower kernels (DeviceCoefficients.misaligned_gemm).
GEMM_ALIGNMENT_BYTES = 16
# Peaks a stage holds on top of states and activations: the largest of each class among its layers.
BUFFERS = "buffer_bytes"  # the one class that lives through the optimizer step too
TRANSIENT_CLASSES = ("backward_transient_bytes", "fsdp_transient_bytes", BUFFERS)


def overlapped(a: float, b: float, coefficient: float) -> float:
    """Time of two activities run concurrently: the longer one plus (coefficient-1) of the shorter
    (1 = perfect overlap, 2 = serialized), as Galvatron and UniAP model it."""
    return max(a, b) + (coefficient - 1.0) * min(a, b)


# The host, for offloaded model states (estimates where not measured): pinned copies reach about 80 % of a PCIe
# link's rate per direction (CUDA's bandwidthTest: 25-26 of Gen4 x16's 32 GB/s); a two-socket server's memory
# about 70 % of its datasheet bandwidth (STREAM).
HOST_LINK_EFFICIENCY = 0.8
HOST_MEMORY_EFFICIENCY = 0.7
# DeepSpeedCPUAdam (DeepSpeed 0.19.8 csrc/adam/cpu_adam_impl.cpp) reads the fp32 parameter, gradient and both
# moments and writes the parameter and moments: 28 bytes per parameter, which it streams at the rate a plain
# memory-bound kernel reaches: measured on a 2-core Xeon VM (benchmarks/cpu_adam.py, 100M parameters,
# benchmarks/data/cpu-adam-2026-11-28.json) 0.163 s on one thread and 0.083 s on two, 17.2 and 33.7 GB/s, where
# torch's add_ reaches 16.1 and 32.1. A DGX node's cores stream more than its memory delivers, so the step is
# priced at the GPU's share of the node's memory bandwidth. The step's result is then cast on the host to the
# parameters' dtype (runtime/zero/stage_1_and_2.py): 4 more bytes read and one parameter's bytes written.
CPU_ADAM_HOST_BYTES = 28.0
CPU_CAST_READ_BYTES = 4.0
# ZeRO++ (Wang et al. 2023; DeepSpeed 0.19.8 runtime/zero/partition_parameters.py,
# runtime/comm/coalesced_collectives.py): weights all-gathered as int8 and gradients reduced as int4, each group
# of up to 8,000 values with one fp32 scale (under 0.1 %), and the quantize/dequantize kernels' HBM bytes per
# parameter per micro-batch (read 2, write 1, read 1, write 2 for the weights; about the same for gradients).
ZEROPP_WEIGHT_RATIO = 0.5
ZEROPP_GRAD_RATIO = 0.25
ZEROPP_QUANTIZATION_TRAFFIC = 9.0
# FP8 and FP4 (Transformer Engine 2.x): each value entering a linear GEMM is quantized in forward (read in the
# compute dtype, written as FP8 and, for the weight-gradient GEMM, as a transposed/column-wise copy), each output
# gradient likewise in backward: 2 + 1 + 1 bytes of HBM traffic per value (an estimate; amax reductions are
# fused into the producing kernels). Weights are quantized once per iteration (megatron-core passes
# is_first_microbatch, so TE caches them over the micro-batches), into the same two FP8 copies that stay
# allocated: 2 bytes per linear weight.
FP8_CAST_TRAFFIC = 4.0
FP8_WEIGHT_COPIES = 2.0
# Bytes per value of the quantized weight copies (row-wise and column-wise) under each format.
WEIGHT_COPY_BYTES = {FP8: FP8_WEIGHT_COPIES, FP4: 2 * NVFP4_BYTES}
# Context parallelism's ring splits each rank's attention into 2 x cp blocks of s / (2 cp) tokens, each its own
# kernel launches: short blocks run far below the unsplit kernel. Measured on one H200 (benchmarks/RESULTS.md,
# attention_kernels.py ring rows, benchmarks/data/h200-2026-11-27-attention.json): one rank's blocks took 13.2x
# its share of the unsplit attention at 1,024 tokens per rank, 3.5x at 2,048, 1.2-1.4x at 4,096, 1.0-1.1x
# from 8,192 on; fitted (within 15 %) as 1 + (3,040 / tokens per rank) ** 2.3.
RING_BLOCK_TOKENS = 3040.0
RING_BLOCK_EXPONENT = 2.3


@dataclass(frozen=True)
class LayerCost:
    """One layer under one strategy, on one device. Memory in bytes allocated (not reserved):
    state_bytes: model states resident while computing (from the second iteration on); activation_bytes: kept
    per in-flight micro-batch; the TRANSIENT_CLASSES: peaks while the layer computes or communicates;
    step_bytes: its model states at the optimizer step's peak, temporaries included (activations are freed
    by then). compute_time: the part of time_per_microbatch that is the layer's own kernels (forward, backward,
    recomputation), the rest being communication and gradient accumulation. host_bytes: offloaded model states
    and activations in host memory, per GPU; host_copy_time: seconds per micro-batch of one copy of the
    layer's offloaded activations between GPU and host (`offload_exposed` prices it per stage)."""

    time_per_microbatch: float
    time_per_iteration: float
    state_bytes: float
    activation_bytes: float
    backward_transient_bytes: float
    fsdp_transient_bytes: float
    buffer_bytes: float
    step_bytes: float
    compute_basis: str
    activation_basis: str
    compute_time: float = 0.0
    host_bytes: float = 0.0
    host_copy_time: float = 0.0


# A stage without recompute spends a third of its compute in the forward and two thirds in the backward.
FORWARD_SHARE = 1.0 / 3.0


def offload_exposed(copy: float, compute: float) -> float:
    """Seconds per micro-batch a stage waits for its offloaded activations: the copies (`copy`, one way, all its
    offloaded layers) run on the copy engine beside the stage's kernels (`compute`), out during the forward and
    back during the backward, so only what exceeds each phase shows (Transformer Engine's cpu_offload spreads
    the offloaded layers evenly among the others and copies one group while the next computes):

        e = max(0, copy - F) + max(0, copy - B),   F = compute / 3,   B = 2 compute / 3."""
    forward = compute * FORWARD_SHARE
    return max(0.0, copy - forward) + max(0.0, copy - (compute - forward))


def ring_slowdown(tokens_per_rank: int) -> float:
    """How much slower one CP rank's attention runs, split into the ring's blocks, than its 1/cp share of the
    unsplit attention: 1 + (RING_BLOCK_TOKENS / tokens per rank) ** RING_BLOCK_EXPONENT."""
    return 1.0 + (RING_BLOCK_TOKENS / tokens_per_rank) ** RING_BLOCK_EXPONENT


def check_quantized(cluster: ClusterSpec, training: TrainingSpec) -> None:
    """Refuse an FP8 or FP4 recipe the cluster's GPUs cannot run (SpecError naming the GPU and what it runs)."""
    fmt, recipe = training.quantized, training.quantized_recipe
    fp8 = fmt == FP8
    peak = cluster.peak_fp8_tflops if fp8 else cluster.peak_fp4_tflops
    runs = cluster.coefficients.fp8_recipes if fp8 else cluster.coefficients.fp4_recipes
    field = "peak_fp8_tflops" if fp8 else "peak_fp4_tflops"
    if peak is None or not runs:
        raise SpecError(
            f"{fmt.upper()} recipe '{recipe}' asked for, but {cluster.gpu_name} ({cluster.name}) has no "
            f"{fmt.upper()} tensor cores (the cluster gives no {field})",
            f"plan in bf16, or for a GPU with {fmt.upper()} ("
            + ("H100, H200, B200, GB200..." if fp8 else "B200, GB200, B300, GB300")
            + f"); a cluster file may set {field}",
        )
    if recipe not in runs:
        raise SpecError(
            f"{fmt.upper()} recipe '{recipe}' does not run on {cluster.gpu_name}: Transformer Engine runs "
            f"{', '.join(runs)} there",
            f"choose one of {', '.join(runs)}",
        )


def vocab_aligned(vocab_size: int, tp: int, vocab_multiple: int, bytes_per_value: int) -> bool:
    """Whether each TP rank's share of the vocabulary, as the framework pads it (`vocab_multiple` x TP), is a
    multiple of 16 bytes of the compute precision: what cuBLAS's fastest kernels need."""
    if vocab_size == 0:
        return True
    padded = -(-vocab_size // (vocab_multiple * tp)) * vocab_multiple * tp
    return (padded // tp) % max(1, GEMM_ALIGNMENT_BYTES // bytes_per_value) == 0


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

    def __init__(
        self, cluster: ClusterSpec, training: TrainingSpec, profile: Profile | None = None, vocab_multiple: int = 1
    ):
        """`vocab_multiple`: the framework pads the vocabulary to a multiple of it times TP (Capability)."""
        self.cluster, self.training, self.profile = cluster, training, profile
        self.vocab_multiple = vocab_multiple
        self.bpv = training.bytes_per_value
        self.coefficients = cluster.coefficients
        measured_overlap = profile.overlap_coefficient if profile else None
        self.overlap = measured_overlap or DEFAULT_OVERLAP
        self.overlap_basis = MEASURED if measured_overlap else ESTIMATED
        calibration = profile.calibration if profile else None
        self.compute_scale = calibration.compute_scale if calibration else 1.0
        fitted = calibration.reserved_per_allocated if calibration else None
        self.reserved_per_allocated = fitted or DEFAULT_RESERVED_PER_ALLOCATED
        self.reserved_basis = CALIBRATED if fitted else ESTIMATED
        self.memory_margin = 0.0 if fitted else ESTIMATED_MEMORY_MARGIN
        self.comm_bases: set[str] = set()
        self.quantized = training.quantized
        self.overlaps = training.overlaps or ()
        if self.quantized:
            check_quantized(cluster, training)

    # --- collectives ------------------------------------------------------------------------------

    def bus_bandwidth(self, op: str, group: int, intra_node: bool, per_node: int = 1) -> float:
        """Bytes/s: measured for this op, group size and scope if the profile has it, else datasheet. A group
        across nodes with `per_node` members in each node's NVLink domain runs hierarchically (NCCL's rings
        over every NIC of the node, rail-aligned): each member carries 1/per_node of the inter-node traffic
        over its own NIC, so the bus bandwidth is per_node NICs' worth, up to NVLink's."""
        scope = "intra_node" if intra_node else "inter_node"
        measured = self.profile.bus_bandwidth(op, group, scope) if self.profile else None
        if measured:
            self.comm_bases.add(MEASURED)
            return measured * 1e9
        self.comm_bases.add(ESTIMATED)
        c = self.cluster
        nvlink = c.intra_node_bandwidth_gbps * c.intra_node_efficiency * 1e9
        if intra_node:
            return nvlink
        return min(nvlink, per_node * c.inter_node_bandwidth_gbps * c.inter_node_efficiency * 1e9)

    def collective(self, op: str, nbytes: float, group: int, intra_node: bool, per_node: int = 1) -> float:
        """Seconds for a ring collective on `nbytes` (the full tensor) over `group` ranks, `per_node` of them in
        each NVLink domain where the group spans several (`bus_bandwidth`)."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        return self.cluster.collective_latency_us * 1e-6 + bus_factor(op, group) * nbytes / self.bus_bandwidth(
            op, group, intra_node, per_node
        )

    def data_parallel_per_node(self, s: Strategy) -> int:
        """Members of one data-parallel (x context-parallel) group inside one NVLink domain: Megatron's rank
        order puts the TP ranks innermost, so a domain of G GPUs holds G / TP of each group."""
        return max(1, min(s.shards, self.cluster.nvlink_gpus // s.tp))

    def host_transfer(self, nbytes: float) -> float:
        """Seconds to copy `nbytes` between one GPU and host memory over its host link (one direction)."""
        if nbytes <= 0:
            return 0.0
        return nbytes / (self.cluster.host_link_bandwidth_gbps * HOST_LINK_EFFICIENCY * 1e9)

    def cpu_adam(self, params: float) -> float:
        """Seconds of DeepSpeedCPUAdam's step over `params` and the cast of the result, on one GPU's share of
        its node's host memory bandwidth (CPU_ADAM_HOST_BYTES: the step is bound by memory, not by the cores)."""
        c = self.cluster
        share = c.host_memory_bandwidth_gbps * HOST_MEMORY_EFFICIENCY * 1e9 / c.gpus_per_node
        return params * (CPU_ADAM_HOST_BYTES + CPU_CAST_READ_BYTES + self.bpv) / share

    def p2p(self, nbytes: float, intra_node: bool) -> float:
        if nbytes <= 0:
            return 0.0
        return self.cluster.collective_latency_us * 1e-6 + nbytes / self.bus_bandwidth("p2p", 2, intra_node)

    # --- layers -----------------------------------------------------------------------------------

    @property
    def hbm_bytes_per_second(self) -> float:
        """HBM bandwidth memory-bound kernels achieve on this GPU model."""
        return self.cluster.hbm_bandwidth_gbps * 1e9 * self.coefficients.memory

    def compute_times(self, layer: Layer, tp: int, samples: float) -> tuple[float, float, str]:
        """(forward, backward) seconds of one replica's micro-batch on one device, and their basis; the
        calibration's compute scale applies to both bases."""
        if self.profile:
            measured = self.profile.layer_times(layer.signature, tp, samples)
            if measured:
                return measured[0] * self.compute_scale, measured[1] * self.compute_scale, MEASURED
        fwd, bwd = self.estimated_compute_times(layer, tp, samples)
        return fwd * self.compute_scale, bwd * self.compute_scale, ESTIMATED

    def estimated_compute_times(self, layer: Layer, tp: int, samples: float) -> tuple[float, float]:
        """GEMM and attention FLOPs at the GPU model's achieved fractions of peak, memory-bound traffic at
        its achieved HBM bandwidth (twice the activations in forward, four times in backward, plus a layer's
        extra traffic in each), plus the fixed part of each pass (see uniap.cluster.devices). A flash
        kernel executes half the scores under a causal mask and recomputes them in backward; without it the
        scores are batched GEMMs and their softmax traffic is part of the activations."""
        co, peak = self.coefficients, self.cluster.peak_tflops * 1e12
        flash = self.training.flash_attention
        quantized = self.runs_quantized(layer)
        attention = self.executed_attention_flops(layer)
        gemm = layer.flops_fwd - layer.attention_flops
        if flash:
            attn_fwd = attention / (peak * co.attention)
            attn_bwd = FLASH_BACKWARD_FLOPS * attention / (peak * co.attention)
        else:
            attn_fwd = attention / (peak * co.gemm_forward)
            attn_bwd = 2.0 * attention / (peak * co.gemm_backward)
        traffic = 2.0 * activation_bytes(layer, tp, samples, "none") / self.hbm_bytes_per_second
        extra = samples * layer.extra_traffic / tp / self.hbm_bytes_per_second
        overhead = co.layer_overhead_ms * 1e-3
        gemm_fwd, gemm_bwd = self.gemm_rates(layer)
        extra_fwd = extra_bwd = extra
        if quantized:  # the quantization of the FP8/FP4 GEMMs' inputs and output gradients
            cast = FP8_CAST_TRAFFIC / tp / self.hbm_bytes_per_second
            extra_fwd += samples * layer.linear_inputs * cast
            extra_bwd += samples * layer.linear_outputs * cast
        if not self.vocab_aligned(layer.vocab_size, tp):  # as if the GEMM had 1/misaligned_gemm times the FLOPs
            gemm += 2.0 * layer.hidden_size * layer.logits * (1.0 / co.misaligned_gemm - 1.0)
        # An embedding's backward writes a dense gradient of its whole table (zero-fill, then scatter-add).
        table = 2.0 * self.bpv * layer.params_tp / tp / self.hbm_bytes_per_second if layer.flops_fwd == 0 else 0.0
        fwd = samples * (gemm / gemm_fwd + attn_fwd) / tp + traffic + extra_fwd + overhead
        bwd = samples * (2.0 * gemm / gemm_bwd + attn_bwd) / tp + 2.0 * traffic + extra_bwd + table + 2.0 * overhead
        return fwd, bwd

    def runs_quantized(self, layer: Layer) -> bool:
        """Whether `layer`'s linear GEMMs run in FP8 or FP4: a transformer layer's under such a recipe (the
        embedding, output layer and attention core stay in the compute dtype, as megatron-core builds them)."""
        return self.quantized is not None and layer.kind in TRANSFORMER_KINDS

    def gemm_rates(self, layer: Layer) -> tuple[float, float]:
        """FLOP/s `layer`'s linear GEMMs reach in forward and backward: the bf16 peak at the GPU model's GEMM
        efficiencies, or under FP8 (FP4) the FP8 (FP4) peak at its efficiency (backward at the bf16 backward/forward
        ratio; an MXFP8 GEMM at the GPU's mxfp8_gemm of the FP8 rate)."""
        co = self.coefficients
        if not self.runs_quantized(layer):
            peak = self.cluster.peak_tflops * 1e12
            return peak * co.gemm_forward, peak * co.gemm_backward
        if self.quantized == FP8:
            forward = self.cluster.peak_fp8_tflops * 1e12 * co.gemm_fp8
            forward *= co.mxfp8_gemm if self.training.fp8_recipe == MXFP8 else 1.0
        else:
            forward = self.cluster.peak_fp4_tflops * 1e12 * co.gemm_fp4
        return forward, forward * co.gemm_backward / co.gemm_forward

    def gemm_times(self, layer: Layer, tp: int, samples: float) -> tuple[float, float]:
        """Seconds of `layer`'s linear GEMMs (forward, backward) for `samples` on one of `tp` ranks: what
        tensor-parallel communication overlaps with."""
        gemm = samples * (layer.flops_fwd - layer.attention_flops) / tp
        forward, backward = self.gemm_rates(layer)
        return gemm / forward, 2.0 * gemm / backward

    def vocab_aligned(self, vocab_size: int, tp: int) -> bool:
        """`vocab_aligned` for this cost model's framework padding and precision."""
        return vocab_aligned(vocab_size, tp, self.vocab_multiple, self.bpv)

    def executed_attention_flops(self, layer: Layer) -> float:
        """Attention FLOPs per sample the kernel executes: a flash kernel skips the masked half of causal scores."""
        skipped = 0.5 * layer.causal_attention_flops if self.training.flash_attention else 0.0
        return layer.attention_flops - skipped

    def attention_forward(self, layer: Layer, tp: int, samples: float) -> float:
        """Seconds of a flash attention kernel's forward for `samples` (what selective recompute repeats)."""
        flops = samples * self.executed_attention_flops(layer) / tp
        return flops / (self.cluster.peak_tflops * 1e12 * self.coefficients.attention)

    def activation(self, layer: Layer, tp: int, samples: float, recompute: str) -> tuple[float, str]:
        """Bytes kept per in-flight micro-batch and their basis: the profile's measurement without
        recompute where it has the layer, else Korthikanti et al.'s count."""
        if recompute == "none" and self.profile:
            measured = self.profile.layer_activation_bytes(layer.signature, tp, samples)
            if measured is not None:
                return measured, MEASURED
        return activation_bytes(layer, tp, samples, recompute), ESTIMATED

    def context_parallel_exposed(self, layer: Layer, s: Strategy, samples: float) -> float:
        """Seconds CP adds per micro-batch: the ring exchange not hidden behind the attention it overlaps (in
        each of cp - 1 steps a rank sends its chunk of keys and values to the next rank while computing on the
        one it holds, TransformerEngine's p2p ring; backward passes keys, values and their gradients, twice the
        bytes; full recompute runs the forward's exchange again), and the attention's own slowdown when split
        into short blocks (`ring_slowdown`). The ranks of a CP group are adjacent after TP (Megatron's rank
        order tp-cp-dp-pp), so the ring stays on NVLink while tp * cp fits its domain. `samples` is the b/cp
        samples' worth each rank computes."""
        if s.cp == 1 or layer.kv_bytes == 0:
            return 0.0
        forwards = 2 if s.recompute == "full" else 1
        attn = self.attention_forward(layer, s.tp, samples)
        blocks = (ring_slowdown(self.training.seq_length // s.cp) - 1.0) * (forwards + FLASH_BACKWARD_FLOPS) * attn
        G = self.cluster.nvlink_gpus
        intra = s.tp * s.cp <= G and G % (s.tp * s.cp) == 0
        chunk = samples * layer.kv_bytes / s.tp  # this rank's keys and values (1/cp of the sequence)
        ring_fwd = (s.cp - 1) * self.p2p(chunk, intra)
        attn_fwd = self.attention_forward(layer, s.tp, samples)
        fwd = overlapped(attn_fwd, ring_fwd, self.overlap) - attn_fwd
        bwd = overlapped(FLASH_BACKWARD_FLOPS * attn_fwd, 2 * ring_fwd, self.overlap) - FLASH_BACKWARD_FLOPS * attn_fwd
        return forwards * fwd + bwd + blocks

    def optimizer_saving(self, zero: int, accounting: Accounting) -> PerParam:
        """Bytes per parameter saved under ZeRO stage `zero` against the accounting's fp32 optimizer states: the
        job's precision-aware optimizer, or a bf16 gradient buffer where the framework would keep it in fp32
        (`grad_reduce_in_bf16`)."""
        t = self.training
        if t.precision_aware_optimizer:
            return precision_aware_saving(
                t.precision, zero, t.main_grads_dtype, t.main_params_dtype, t.exp_avg_dtype, t.exp_avg_sq_dtype
            )
        if t.grad_reduce_in_bf16 and accounting.fp32_grads:  # the buffer's fp32 gradients, in bf16
            half = FP32_BYTES - self.bpv
            return PerParam(0.0, half) if zero >= 2 else PerParam(half)
        return PerParam()

    def grad_bytes(self, accounting: Accounting) -> int:
        """Bytes per gradient value the data-parallel reduction moves: fp32 where the framework's buffer is."""
        t = self.training
        fp32 = accounting.fp32_grads and t.precision == "bf16" and not t.grad_reduce_in_bf16
        return 4 if fp32 and not (t.precision_aware_optimizer and t.main_grads_dtype == "bf16") else self.bpv

    def optimizer_step(
        self,
        params: float,
        optimizer_params: float,
        resident: float,
        s: Strategy,
        pipelined: bool,
        accounting: Accounting,
        saving: PerParam,
    ) -> tuple[float, float]:
        """(seconds, bytes at the step's peak) of the optimizer step for a layer's `params` on this device, of
        which this rank updates `optimizer_params` and which hold `resident` bytes of states while computing:
        the profile's measured step scaled by parameters where it has one (its temporaries on top of the
        resident states), else the framework's HBM traffic and bytes (uniap.cost.accounting), less the
        precision-aware optimizer's `saving` (`optimizer_saving`)."""
        precision, fused, optimizer = self.training.precision, self.training.fused_kernels, self.training.optimizer
        measured = self.profile.optimizer if self.profile else None
        if measured is not None:
            per_param = optimizer_params / measured.num_params
            if measured.extra_peak_bytes is None:
                extra = optimizer_params * accounting.foreach_temporary(fused, optimizer)
            else:
                extra = measured.extra_peak_bytes * per_param
            return measured.step_ms * 1e-3 * per_param, resident + extra
        seconds = optimizer_params * accounting.step_traffic(fused) / self.hbm_bytes_per_second
        peak = params * accounting.step_bytes(precision, s.zero, pipelined, optimizer, saving).at(s.shards)
        return seconds, peak + optimizer_params * accounting.foreach_temporary(fused, optimizer)

    def layer_cost(
        self,
        layer: Layer,
        s: Strategy,
        micro_batch_all_replicas: int,
        pipeline_degree: int,
        stage_intra_node: bool,
        accounting: Accounting,
    ) -> LayerCost:
        """Cost of `layer` under `s` for micro-batches of `micro_batch_all_replicas` samples, with
        the target framework's `accounting` of model states."""
        # Per replica b samples; each of its CP ranks computes b/cp samples' worth. Weights are replicated
        # (and gradients reduced, states sharded) over dp * cp ranks.
        b = micro_batch_all_replicas // s.dp / s.cp
        bpv, tp, dp = self.bpv, s.tp, s.shards
        precision, fused = self.training.precision, self.training.fused_kernels
        fwd, bwd, basis = self.compute_times(layer, tp, b)
        act, act_basis = self.activation(layer, tp, b, s.recompute)
        full_act = self.activation(layer, tp, b, "none")[0]
        if s.recompute == "full":
            compute = 2 * fwd + bwd
        elif s.recompute == "selective" and self.training.flash_attention:
            compute = fwd + bwd + self.attention_forward(layer, tp, b)  # the flash kernel runs again
        elif s.recompute == "selective":
            compute = fwd + bwd + 2.0 * b * layer.act_scores / tp / self.hbm_bytes_per_second
        else:
            compute = fwd + bwd

        tp_comm = self.tensor_parallel_exposed(layer, s, b) + self.context_parallel_exposed(layer, s, b)
        host = copy = 0.0
        if s.offload_activations:
            # Out to the host after the forward, back before the backward (Transformer Engine's cpu_offload): the
            # copies' time counts per stage (`offload_exposed`); their reads and writes of HBM take it from the
            # kernels. On the GPU the layer's activations live only while they are made or used and copied: two
            # layers' worth, this one's and its neighbour's.
            tp_comm += 2 * act / self.hbm_bytes_per_second
            host, act, copy = act, 0.0, self.host_transfer(act)

        # A tied weight that shares a stage with its twin (pipeline degree 1) holds no extra copy.
        params_tp = 0 if (layer.tied_weights and pipeline_degree == 1) else layer.params_tp
        params = params_tp / tp + layer.params_rep
        weight_bytes = params * bpv
        pipelined = pipeline_degree > 1
        # A pipeline's own optimizer wrapper (its all-reduce and buffers) runs where the states stay on the GPU.
        wrapped = pipelined and s.offload == OFFLOAD_NONE
        allreduce = accounting.pipelined_allreduce.get((precision, s.zero)) if wrapped else None
        per_mb_comm, exposed_iter = self.zero_communication(
            s,
            weight_bytes,
            params * self.grad_bytes(accounting),
            fwd,
            bwd,
            stage_intra_node,
            None if allreduce is None else params * allreduce,
        )
        if s.zeropp:  # quantizing before, dequantizing after each collective
            per_mb_comm += params * ZEROPP_QUANTIZATION_TRAFFIC / self.hbm_bytes_per_second
        # Gradient accumulation into the framework's buffer after each micro-batch's backward, and the
        # optimizer step over the parameters this rank updates.
        accumulate = params * accounting.accumulation_traffic(precision, fused) / self.hbm_bytes_per_second
        optimizer_params = params / s.shards if s.zero >= 1 else params
        saving = self.optimizer_saving(s.zero, accounting)
        if s.offload == OFFLOAD_NONE:
            per_param = accounting.state_bytes(precision, s.zero, pipelined, self.training.optimizer, saving)
            state = params * per_param.at(s.shards)
            optimizer, step_bytes = self.optimizer_step(
                params, optimizer_params, state, s, pipelined, accounting, saving
            )
        else:
            # The CPU steps the states in host memory; gradients go down each micro-batch, weights come back
            # after the step, and offloaded parameters come up for each forward and backward.
            off = accounting.offload(precision, s.zero, s.offload)
            state, host = params * off.device.at(s.shards), host + params * off.host.at(s.shards)
            per_mb_comm += self.host_transfer(optimizer_params * (off.microbatch_bytes + 2 * off.fetch_bytes))
            optimizer = self.cpu_adam(optimizer_params) + self.host_transfer(optimizer_params * off.step_bytes)
            step_bytes = params * off.at_step.at(s.shards)
        if s.zeropp:  # ZeRO++'s secondary copy of the weights in their dtype, split over a node's ranks
            secondary = weight_bytes / min(dp, self.cluster.gpus_per_node)
            state, step_bytes = state + secondary, step_bytes + secondary
        copies = WEIGHT_COPY_BYTES[self.quantized] if self.runs_quantized(layer) else 0.0
        quantized_weights = layer.params_tp / tp * copies
        if quantized_weights and self.training.fp8_param_gather and s.zero >= 1:
            # With the distributed optimizer or FSDP (Megatron-LM validate_args) the parameter itself is FP8
            # (one byte instead of the compute dtype's), with its transposed copy.
            quantized_weights = layer.params_tp / tp * (FP8_WEIGHT_COPIES - self.bpv)
        if quantized_weights:  # quantized once per iteration into two copies, which live with the weights
            optimizer += layer.params_tp / tp * (self.bpv + copies) / self.hbm_bytes_per_second
            if s.zero == 3:
                quantized_weights /= dp  # sharded like the weights; a gathered layer's copies are part of its peak
            state, step_bytes = state + quantized_weights, step_bytes + quantized_weights
        # While one layer recomputes, its full activations live, and a head's loss may allocate per logit in its
        # backward (the framework's accounting); FSDP holds a layer's gathered weights and prefetches the next one's.
        backward_transient = {"none": 0.0, "full": full_act, "selective": b * layer.act_scores / tp}[s.recompute]
        backward_transient += b * layer.logits / tp * accounting.loss_backward_bytes_per_logit
        if s.offload_activations:
            backward_transient = max(backward_transient, 2 * host)
        fsdp_transient = 2 * (weight_bytes + quantized_weights * dp) if s.zero == 3 else 0.0
        buffers = accounting.buffers(s.zero, layer.hidden_size, wrapped) * bpv if (dp > 1 or s.zero) and params else 0.0
        return LayerCost(
            time_per_microbatch=overlapped(compute, per_mb_comm, self.overlap) + tp_comm + accumulate,
            time_per_iteration=exposed_iter + optimizer,
            state_bytes=state,
            activation_bytes=act,
            backward_transient_bytes=backward_transient,
            fsdp_transient_bytes=fsdp_transient,
            buffer_bytes=buffers,
            step_bytes=step_bytes,
            compute_basis=basis,
            activation_basis=act_basis,
            compute_time=compute,
            host_bytes=host,
            host_copy_time=copy,
        )

    def tensor_parallel_exposed(self, layer: Layer, s: Strategy, samples: float) -> float:
        """Seconds per micro-batch of TP's collectives on the critical path: with sequence parallelism an
        all-gather before and a reduce-scatter after each block in forward (the volume of one all-reduce of the
        layer's `tp_comm_bytes`), the same in backward, and again in a fully recomputed forward. Overlapped with
        the linear GEMMs (Transformer Engine's userbuffers under --tp-comm-overlap: each collective split into
        chunks pipelined with the GEMM that consumes or produces it, the weight-gradient GEMMs hiding the
        backward's bulk collectives), only what exceeds the GEMMs, plus the overlap coefficient's share of
        the rest, stays exposed."""
        if s.tp == 1:
            return 0.0
        one_way = self.collective("all_reduce", layer.tp_comm_bytes * samples, s.tp, True)
        forwards = 2 if s.recompute == "full" else 1
        if TP_COMM_OVERLAP not in self.overlaps:
            return one_way * (forwards + 1)
        fwd, bwd = self.gemm_times(layer, s.tp, samples)
        return forwards * (overlapped(fwd, one_way, self.overlap) - fwd) + overlapped(bwd, one_way, self.overlap) - bwd

    def zero_communication(
        self,
        s: Strategy,
        weight_bytes: float,
        grad_bytes: float,
        forward: float,
        backward: float,
        stage_intra_node: bool,
        allreduce: float | None = None,
    ) -> tuple[float, float]:
        """(seconds per micro-batch overlapped with compute, seconds exposed once per iteration) of the
        data-parallel collectives on a layer's `weight_bytes` and `grad_bytes` (its gradients in the dtype the
        framework reduces them in):

        DP: all-reduce overlapped with the last backward; ZeRO-1: reduce-scatter overlapped with it, then the
        all-gather of updated weights; ZeRO-2: reduce-scatter each micro-batch, the all-gather once; ZeRO-3:
        all-gather in forward and backward and reduce-scatter each micro-batch. ZeRO++ gathers int8 weights for
        forward over all ranks, bf16 ones from the node's secondary copy for backward, and reduces int4
        gradients through a node-local then a cross-node all-to-all. `allreduce`: bytes a framework's pipeline
        wrapper all-reduces instead (Accounting.pipelined_allreduce), overlapped with the last backward, then
        the all-gather of the updated weights. Under PARAM_GATHER_OVERLAP the all-gather of updated weights
        overlaps the layer's next `forward` (Megatron-LM's --overlap-param-gather)."""
        dp, G = s.shards, self.cluster.gpus_per_node
        if dp == 1:
            return 0.0, 0.0
        k = self.data_parallel_per_node(s)
        if allreduce is not None:
            ar = self.collective("all_reduce", allreduce, dp, stage_intra_node, k)
            ag = self.collective("all_gather", weight_bytes, dp, stage_intra_node, k)
            return 0.0, overlapped(backward, ar, self.overlap) - backward + ag
        if s.zeropp:
            node = min(dp, G)
            forward = self.collective("all_gather", weight_bytes * ZEROPP_WEIGHT_RATIO, dp, False, k)
            backward_gather = self.collective("all_gather", weight_bytes, node, True)
            reduce = self.collective("all_to_all", weight_bytes * ZEROPP_GRAD_RATIO, node, True) + self.collective(
                "all_to_all", weight_bytes * ZEROPP_GRAD_RATIO / node, dp // node, False
            )
            return forward + backward_gather + reduce, 0.0
        ag = self.collective("all_gather", weight_bytes, dp, stage_intra_node, k)
        rs = self.collective("reduce_scatter", grad_bytes, dp, stage_intra_node, k)
        if s.zero == 3:
            return 2 * ag + rs, 0.0
        if s.zero == 2:
            return rs, ag
        if s.zero == 1:
            if PARAM_GATHER_OVERLAP in self.overlaps:
                ag = overlapped(forward, ag, self.overlap) - forward
            return 0.0, overlapped(backward, rs, self.overlap) - backward + ag
        ar = self.collective("all_reduce", grad_bytes, dp, stage_intra_node, k)
        return 0.0, overlapped(backward, ar, self.overlap) - backward
