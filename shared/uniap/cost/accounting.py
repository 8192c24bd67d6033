"""How a framework keeps and updates model states: bytes per parameter it holds, and the memory traffic of
gradient accumulation and of the optimizer step.

Each target declares one `Accounting` in its capability (the adapters declare Megatron-LM's and
DeepSpeed's from their sources); the cost model prices memory and time from it. `PerParam` is the ZeRO
picture of a parameter's bytes: what every data-parallel rank holds in full plus what the d ranks split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError

PRECISIONS = ("bf16", "fp16", "fp32")
FP32_BYTES = 4
# torch.optim.AdamW's foreach step (torch 2.x, torch/optim/adamw.py _multi_tensor_adamw) allocates
# sqrt(exp_avg_sq) for every parameter of a group at once: one fp32 value per optimizer-local parameter.
FOREACH_ADAM_TEMPORARY = FP32_BYTES
# HBM bytes per optimizer-local parameter of one Adam step, counting each kernel's reads and writes:
# fused (one multi-tensor kernel: read param, grad, m, v; write param, m, v; then the low-precision copy of
# the updated param, the gradient-norm read and the gradient-buffer reset) and foreach (torch's separate
# lerp/mul/addcmul/sqrt/div/add/addcdiv/weight-decay passes, each over every tensor).
FUSED_ADAM_STEP_TRAFFIC = 46.0
FOREACH_ADAM_STEP_TRAFFIC = 94.0
# fp32 optimizer-state bytes per parameter: the accountings below are written for Adam (two moments); SGD
# with momentum (torch.optim.SGD, megatron-core's 'sgd') and Muon (one momentum buffer; megatron-core
# 0.16.1 optimizer/muon.py) keep one.
ADAM = "adam"
OPTIMIZER_STATE_BYTES = {ADAM: 2 * FP32_BYTES, "sgd": FP32_BYTES, "muon": FP32_BYTES}
# Bytes per value of the dtypes a precision-aware optimizer keeps its tensors in.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# With bf16 parameters and an fp32 master copy, TransformerEngine's FusedAdam (>= 2.1) keeps only the 16 bits
# of each master value that the bf16 parameter lacks (megatron-core 0.16.1 OptimizerConfig.store_param_remainders,
# on by default).
PARAM_REMAINDER_BYTES = 2


@dataclass(frozen=True)
class PerParam:
    """Bytes per parameter: `replicated` on every data-parallel rank plus `sharded` split over the d ranks."""

    replicated: float = 0.0
    sharded: float = 0.0

    def __post_init__(self) -> None:
        if self.replicated < 0 or self.sharded < 0:
            raise SpecError(f"invalid bytes per parameter {self.replicated!r} + {self.sharded!r}/d (must be >= 0)")

    def at(self, dp: int) -> float:
        return self.replicated + self.sharded / dp

    def __str__(self) -> str:
        if not self.sharded:
            return f"{self.replicated:g}"
        return f"{self.replicated:g} + {self.sharded:g}/d" if self.replicated else f"{self.sharded:g}/d"


@dataclass(frozen=True)
class Offloaded:
    """Model states with part of them in host memory (ZeRO-Offload): bytes per parameter on the GPU and on the
    host (PerParam over the ranks sharding the states), and what crosses the host link per parameter a rank
    updates: `microbatch_bytes` each micro-batch (gradients to the host and back to accumulate),
    `step_bytes` around the CPU's step (gradients down, updated weights up), `fetch_bytes` host to device in
    each forward and each backward (offloaded parameters). `device_step`: the GPU's bytes at the optimizer
    step's peak (None: `device`)."""

    device: PerParam
    host: PerParam
    microbatch_bytes: float
    step_bytes: float
    fetch_bytes: float = 0.0
    device_step: PerParam | None = None

    def __post_init__(self) -> None:
        for name in ("microbatch_bytes", "step_bytes", "fetch_bytes"):
            if getattr(self, name) < 0:
                raise SpecError(f"invalid offloaded states: {name} {getattr(self, name)!r} (must be >= 0)")

    @property
    def at_step(self) -> PerParam:
        return self.device if self.device_step is None else self.device_step


@dataclass(frozen=True)
class Accounting:
    """A framework's model-state memory and optimizer traffic, per (precision, ZeRO stage).

    states: bytes per parameter resident while the model computes, from the second iteration on (weights,
      gradient buffers, fp32 master copy, Adam moments, any fp32 gradient copy), keyed by (precision, zero).
    step: bytes per parameter at the optimizer step's peak (what is resident then plus the step's
      temporaries), same keys; missing keys mean the same as `states`.
    pipelined_states / pipelined_step: what replaces them when the pipeline has more than one stage (a
      framework that wraps its optimizer differently there).
    torch_adam_without_fused_kernels: without Transformer Engine/Apex the framework steps with torch's
      foreach AdamW (megatron-core's fallback), which adds FOREACH_ADAM_TEMPORARY per optimizer-local
      parameter and its traffic.
    grad_accumulation_traffic: HBM bytes per parameter per micro-batch to add the micro-batch's gradients
      into the gradient buffer, per precision; `fusable_grad_accumulation`: fused kernels do it inside the
      weight-gradient GEMM (Megatron's gradient-accumulation fusion), costing nothing extra.
    buffer_elements: elements (in the model's dtype) per GPU that do not scale with parameters
      (communication buckets), per ZeRO stage, when there is data parallelism; buffer_hidden_squares: more
      of them per squared hidden size, for buckets sized to the model.
    loss_backward_bytes_per_logit: bytes per logit (Layer.logits, split by TP) the loss's backward allocates
      beyond what the head keeps for it, while every activation of the stage is still alive.
    offloaded: model states and host-link traffic per (precision, ZeRO stage, offload mode) where the framework
      offloads (Strategy.offload).
    pipelined_allreduce: where, under a pipeline, the framework's optimizer wrapper all-reduces gradients of
      this many bytes per parameter at the accumulation boundary and then all-gathers the updated weights
      (instead of the ZeRO stage's own collectives), per (precision, zero); pipelined_buffer_elements: its
      flattening buffers (elements in the model's dtype) per ZeRO stage, replacing buffer_elements.
    """

    name: str
    source: str
    states: dict[tuple[str, int], PerParam]
    step: dict[tuple[str, int], PerParam] = field(default_factory=dict)
    pipelined_states: dict[tuple[str, int], PerParam] = field(default_factory=dict)
    pipelined_step: dict[tuple[str, int], PerParam] = field(default_factory=dict)
    torch_adam_without_fused_kernels: bool = False
    grad_accumulation_traffic: dict[str, float] = field(default_factory=dict)
    fusable_grad_accumulation: bool = False
    buffer_elements: dict[int, float] = field(default_factory=dict)
    buffer_hidden_squares: dict[int, float] = field(default_factory=dict)
    loss_backward_bytes_per_logit: float = 0.0
    offloaded: dict[tuple[str, int, str], Offloaded] = field(default_factory=dict)
    pipelined_allreduce: dict[tuple[str, int], float] = field(default_factory=dict)
    pipelined_buffer_elements: dict[int, float] = field(default_factory=dict)
    fp32_grads: bool = False

    def offload(self, precision: str, zero: int, mode: str) -> Offloaded:
        """The offloaded states of `mode` under ZeRO stage `zero`; SpecError where the framework has none."""
        try:
            return self.offloaded[(precision, zero, mode)]
        except KeyError:
            raise SpecError(
                f"accounting '{self.name}' has no offloaded states for {precision} with ZeRO stage {zero} ({mode})"
            ) from None

    def buffers(self, zero: int, hidden_size: int, pipelined: bool = False) -> float:
        """Elements of communication buffers per GPU under ZeRO stage `zero` for a model of `hidden_size`."""
        constant = self.buffer_elements.get(zero, 0.0)
        if pipelined:
            constant = self.pipelined_buffer_elements.get(zero, constant)
        return constant + self.buffer_hidden_squares.get(zero, 0.0) * hidden_size**2

    def __post_init__(self) -> None:
        for table in (self.states, self.step, self.pipelined_states, self.pipelined_step):
            for precision, zero in table:
                if precision not in PRECISIONS or zero not in (0, 1, 2, 3):
                    raise SpecError(f"invalid accounting '{self.name}': key ({precision!r}, {zero!r})")

    def state_bytes(
        self, precision: str, zero: int, pipelined: bool = False, optimizer: str = ADAM, saving: PerParam = PerParam()
    ) -> PerParam:
        """Bytes per parameter resident while computing, less a precision-aware optimizer's `saving`."""
        key = (precision, zero)
        if pipelined and key in self.pipelined_states:
            return with_optimizer(self.pipelined_states[key], optimizer, saving)
        try:
            return with_optimizer(self.states[key], optimizer, saving)
        except KeyError:
            raise SpecError(
                f"accounting '{self.name}' has no model-state bytes for {precision} with ZeRO stage {zero}"
            ) from None

    def step_bytes(
        self, precision: str, zero: int, pipelined: bool = False, optimizer: str = ADAM, saving: PerParam = PerParam()
    ) -> PerParam:
        """Bytes per parameter at the optimizer step's peak, with fused kernels."""
        key = (precision, zero)
        if pipelined and key in self.pipelined_step:
            return with_optimizer(self.pipelined_step[key], optimizer, saving)
        if pipelined and key in self.pipelined_states:
            return with_optimizer(self.pipelined_states[key], optimizer, saving)
        if key in self.step:
            return with_optimizer(self.step[key], optimizer, saving)
        return self.state_bytes(precision, zero, optimizer=optimizer, saving=saving)

    def foreach_temporary(self, fused_kernels: bool, optimizer: str = ADAM) -> float:
        """Bytes per optimizer-local parameter torch's foreach AdamW adds at the step, when it is used."""
        adam = optimizer == ADAM and self.torch_adam_without_fused_kernels
        return FOREACH_ADAM_TEMPORARY if adam and not fused_kernels else 0.0

    def step_traffic(self, fused_kernels: bool) -> float:
        """HBM bytes per optimizer-local parameter of one optimizer step."""
        torch_adam = not fused_kernels and self.torch_adam_without_fused_kernels
        return FOREACH_ADAM_STEP_TRAFFIC if torch_adam else FUSED_ADAM_STEP_TRAFFIC

    def accumulation_traffic(self, precision: str, fused_kernels: bool) -> float:
        """HBM bytes per parameter per micro-batch spent adding its gradients into the gradient buffer."""
        if fused_kernels and self.fusable_grad_accumulation:
            return 0.0
        return self.grad_accumulation_traffic.get(precision, 0.0)

    def to_dict(self) -> dict[str, Any]:
        def table(rows: dict[tuple[str, int], PerParam]) -> dict[str, str]:
            return {f"{p}/zero{z}": str(v) for (p, z), v in rows.items()}

        return {
            "name": self.name,
            "source": self.source,
            "states": table(self.states),
            "step": table(self.step),
            "pipelined_states": table(self.pipelined_states),
            "pipelined_step": table(self.pipelined_step),
            "torch_adam_without_fused_kernels": self.torch_adam_without_fused_kernels,
            "grad_accumulation_traffic": dict(self.grad_accumulation_traffic),
            "fusable_grad_accumulation": self.fusable_grad_accumulation,
            "buffer_elements": {str(k): v for k, v in self.buffer_elements.items()},
            "buffer_hidden_squares": {str(k): v for k, v in self.buffer_hidden_squares.items()},
            "pipelined_allreduce": {f"{p}/zero{z}": v for (p, z), v in self.pipelined_allreduce.items()},
            "pipelined_buffer_elements": {str(k): v for k, v in self.pipelined_buffer_elements.items()},
            "offloaded": {
                f"{p}/zero{z}/{m}": {
                    "device": str(o.device),
                    "device_step": str(o.at_step),
                    "host": str(o.host),
                    "microbatch_bytes": o.microbatch_bytes,
                    "step_bytes": o.step_bytes,
                    "fetch_bytes": o.fetch_bytes,
                }
                for (p, z, m), o in self.offloaded.items()
            },
        }


def with_optimizer(per_param: PerParam, optimizer: str, saving: PerParam = PerParam()) -> PerParam:
    """Adam's bytes per parameter for `optimizer`: fewer fp32 states, taken from the part ZeRO shards when
    there is one (the optimizer states are what it shards first), else from what every rank holds; less a
    precision-aware optimizer's `saving`."""
    fewer = OPTIMIZER_STATE_BYTES[ADAM] - OPTIMIZER_STATE_BYTES[optimizer]
    if fewer and per_param.sharded >= fewer:
        per_param = PerParam(per_param.replicated, per_param.sharded - fewer)
    elif fewer:
        per_param = PerParam(per_param.replicated - fewer, per_param.sharded)
    return PerParam(max(0.0, per_param.replicated - saving.replicated), max(0.0, per_param.sharded - saving.sharded))


def precision_aware_saving(
    precision: str, zero: int, main_grads: str, main_params: str, exp_avg: str, exp_avg_sq: str
) -> PerParam:
    """Bytes per parameter a precision-aware optimizer saves against fp32 gradients, master parameters and Adam
    moments (megatron-core 0.16.1 optimizer/optimizer_config.py with TransformerEngine's FusedAdam): bf16
    gradients in the buffer (bf16 training), a 16-bit master (fp16, or bf16's remainders), smaller moments.
    The buffer's gradients are what every rank holds up to ZeRO-1; ZeRO shards the rest from stage 1 on."""
    grads = FP32_BYTES - DTYPE_BYTES[main_grads] if precision == "bf16" else 0
    if precision == "bf16" and main_params == "fp32":
        master = FP32_BYTES - PARAM_REMAINDER_BYTES
    elif precision in ("bf16", "fp16"):
        master = FP32_BYTES - DTYPE_BYTES[main_params]
    else:
        master = 0  # fp32 training has no separate master copy
    moments = 2 * FP32_BYTES - DTYPE_BYTES[exp_avg] - DTYPE_BYTES[exp_avg_sq]
    if zero == 0:
        return PerParam(grads + master + moments)
    if zero == 1:
        return PerParam(grads, master + moments)
    return PerParam(0.0, grads + master + moments)


def zero_sharded(weights: float, grads: float, optimizer: float) -> dict[int, PerParam]:
    """The ZeRO paper's picture (Rajbhandari et al. 2020): stage 1 shards the optimizer states, 2 also the
    gradients, 3 also the weights."""
    return {
        0: PerParam(weights + grads + optimizer),
        1: PerParam(weights + grads, optimizer),
        2: PerParam(weights, grads + optimizer),
        3: PerParam(0.0, weights + grads + optimizer),
    }


def _generic_states() -> dict[tuple[str, int], PerParam]:
    out = {}
    for precision in PRECISIONS:
        value = 4 if precision == "fp32" else 2
        master = 0 if precision == "fp32" else FP32_BYTES
        for zero, per_param in zero_sharded(value, value, master + 2 * FP32_BYTES).items():
            out[(precision, zero)] = per_param
    return out


GENERIC_ACCOUNTING = Accounting(
    name="generic",
    source="the ZeRO paper's mixed-precision Adam (2 + 2 + 12 bytes per parameter in bf16/fp16, 4 + 4 + 8 "
    "in fp32), sharded per ZeRO stage; an idealised runtime with fused kernels and no buffers",
    states=_generic_states(),
)
