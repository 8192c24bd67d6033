"""What DeepSpeed 0.19 can run and how it keeps model states, declared once for the core's planner.

- no tensor parallelism (a plain model or a PipelineModule has no TP of its own);
- one ZeRO stage for the whole engine; ZeRO-2/3 only without pipeline parallelism (the pipeline engine
  asserts "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism");
- one activation-checkpointing setting for all transformer layers.

Model states, for the config uniap emits (gradients accumulate in the model's dtype, except under a pipeline with
bf16 and ZeRO-1, where data_types.grad_accum_dtype is fp32) and an Adam/AdamW optimizer section, which DeepSpeed
runs as its FusedAdam (DeepSpeed 0.19.8 deepspeed/runtime/engine.py `_do_optimizer_sanity_check`,
`_configure_optimizer`). Bytes per parameter over d data-parallel ranks, read from the source and measured on 2 CPU
ranks (bf16 and fp32; fp16 runs the same classes as bf16 but CPUs refuse it), while computing / at the optimizer
step's peak:
- bf16/fp16 ZeRO-0 (FP16_Optimizer, runtime/fp16/fused_optimizer.py): 2 weights + 4 fp32 master + 8 moments
  + 2 gradients = 16; the step casts every gradient to fp32 and flattens: 24.
- bf16 ZeRO-0 in a PipelineModule (BF16_Optimizer, runtime/bf16_optimizer.py: a full bf16 accumulation buffer,
  fp32 master and moments partitioned): 6 + 12/d; at the step 6 + 16/d. It all-reduces the accumulated
  gradients at the boundary (engine.py buffered_allreduce_fallback, flattening up to 5e8 elements at a time)
  and all-gathers the updated weights (update_lp_params).
- bf16 ZeRO-1 with fp32 accumulation (also BF16_Optimizer, the only way DeepSpeed 0.19.8 accumulates a bf16
  pipeline's gradients in fp32: engine.py `_do_optimizer_sanity_check`): the weights, their bf16 gradients and
  a full fp32 accumulation buffer (_hp_grad), 8 + 12/d; at the step 8 + 16/d (measured at d = 2: 14 / 16). Its
  all-reduce carries fp32: twice the bytes, and a flattening buffer twice the size.
- ZeRO-1 (DeepSpeedZeroOptimizer, runtime/zero/stage_1_and_2.py): full gradients until the end of backward,
  4 + 12/d; then a partition, its fp32 cast at the step: 2 + 20/d. ZeRO-2: 2 + 14/d, at the step 2 + 20/d.
- ZeRO-3 (runtime/zero/stage3.py): 16/d (the bf16 gradient partition is made at init); at the step 22/d.
- fp32: ZeRO-0 16; ZeRO-1 8 + 12/d, at the step 4 + 20/d; ZeRO-2 4 + 16/d, 4 + 20/d; ZeRO-3 20/d, 24/d.
Buckets (elements in the model's dtype): ZeRO-1/2 allocate two reduce buckets per backward (overlap_comm, or a
PipelineModule's extra one) and flatten a bucket's worth more while reducing; ZeRO-3 keeps one reduce bucket,
prefetches up to stage3_prefetch_bucket_size and keeps parameters gathered up to stage3_max_live_parameters
(with stage3_max_reuse_distance 1e9 most of a forward's parameters stay gathered until backward); ZeRO-0
flattens gradients in reduce-bucket-sized chunks for the all-reduce.

Offloaded to host memory (offload_optimizer / offload_param with device "cpu"), read from the source
(stage_1_and_2.py, stage3.py, partition_parameters.py), P parameters over d ranks, in bf16 (fp32: 4-byte
weights, gradients and staging buffers):
- ZeRO-1: the GPU keeps the bf16 weights and their full gradients until the boundary (4); the host the fp32
  master, its fp32 gradient, a bf16 staging copy and the moments (18/d). Only at the boundary do gradients go
  down (cast to fp32 on the GPU: the step holds the weights and that cast, 2 + 4/d) and the weights come back
  in bf16 (2/d).
- ZeRO-2: the GPU keeps the bf16 weights (2), 4/d more at the step for the same cast; the host also
  accumulates the bf16 gradients (20/d): each micro-batch's go down and the sum comes back up to be added on
  the GPU (2 + 2 per micro-batch).
- ZeRO-3, optimizer: the GPU keeps the bf16 weight partition (2/d); the host the bf16 gradient partition it
  accumulates in and the optimizer's 16 (18/d), with the same traffic as ZeRO-2.
- ZeRO-3, parameters too: the weight partition moves to the host (20/d, always pinned) and comes up for
  each forward and each backward (2/d each), on the prefetch stream; the step writes it on the host.
Measured on 2 CPU ranks, where host and device are one memory (tests/test_deepspeed_memory.py): the sum of the
GPU's and the host's bytes, while computing and at the step. Unmeasured on a GPU: what pinned host buffers and
the transfers cost there is an estimate. Besides, offloading allocates two gradient-sized scratch buffers of the
largest parameter (temp_grad_buffer_for_cpu_offload / _for_gpu_offload), which no model-sized term counts.
"""

from uniap.cost.accounting import FP32_BYTES, Accounting, Offloaded, PerParam
from uniap.cost.strategy import OFFLOAD_MODES, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, Capability

# ZeRO's buckets sized to the model as Hugging Face's DeepSpeed integration sizes its "auto" values
# (transformers integrations/deepspeed.py: reduce_bucket_size h*h, stage3_prefetch_bucket_size 0.9*h*h,
# stage3_param_persistence_threshold 10*h) instead of DeepSpeed's fixed defaults (zero/config.py: 5e8, 5e7,
# 1e5), which are the same for a 125M and a 70B model.
REDUCE_BUCKET_PER_HIDDEN_SQUARE = 1.0
PREFETCH_BUCKET_PER_HIDDEN_SQUARE = 0.9
PERSISTENCE_THRESHOLD_PER_HIDDEN = 10
# A model's loss as plain PyTorch computes it (Hugging Face's models, uniap_deepspeed.layers.LMHead:
# F.cross_entropy over logits cast to fp32) allocates in backward the fp32 gradient of the log-softmax and
# more while the saved logits are alive: measured on one H200 (bf16, torch 2.11, whole DeepSpeed iterations,
# 2026-11-27) 7.8 bytes per logit for a GPT-3-2.7B shape (micro-batch 4 x 2048 x 50,257) and 8.0 for
# Llama-2-7B (1 x 4096 x 32,000) above the end of the forward.
LOSS_BACKWARD_BYTES_PER_LOGIT = 8.0
# ZeRO-0 all-reduces gradients in chunks of a fixed size (engine.py MEMORY_OPT_ALLREDUCE_SIZE), not configurable.
ZERO0_ALLREDUCE_CHUNK = 500_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's defaults, kept
STAGE3_MAX_REUSE_DISTANCE = 1_000_000_000


# ZeRO-1/2 assert bucket sizes are a multiple of this (runtime/zero/stage_1_and_2.py nccl_start_alignment_factor).
BUCKET_ALIGNMENT = 2


def zero_buckets(hidden_size: int) -> dict[str, int]:
    """The bucket and threshold values (elements) for a model of `hidden_size`, buckets rounded up to
    BUCKET_ALIGNMENT (an odd hidden size would otherwise be refused)."""
    square = hidden_size * hidden_size

    def bucket(per_square: float) -> int:
        return -(-int(per_square * square) // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT

    return {
        "reduce_bucket_size": bucket(REDUCE_BUCKET_PER_HIDDEN_SQUARE),
        "allgather_bucket_size": bucket(REDUCE_BUCKET_PER_HIDDEN_SQUARE),
        "stage3_prefetch_bucket_size": bucket(PREFETCH_BUCKET_PER_HIDDEN_SQUARE),
        "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD_PER_HIDDEN * hidden_size,
    }


_HALF = {
    0: (PerParam(16.0), PerParam(24.0)),
    1: (PerParam(4.0, 12.0), PerParam(2.0, 20.0)),
    2: (PerParam(2.0, 14.0), PerParam(2.0, 20.0)),
    3: (PerParam(0.0, 16.0), PerParam(0.0, 22.0)),
}
_FP32 = {
    0: (PerParam(16.0), PerParam(16.0)),
    1: (PerParam(8.0, 12.0), PerParam(4.0, 20.0)),
    2: (PerParam(4.0, 16.0), PerParam(4.0, 20.0)),
    3: (PerParam(0.0, 20.0), PerParam(0.0, 24.0)),
}
_TABLES = {"bf16": _HALF, "fp16": _HALF, "fp32": _FP32}


def _offloaded(value: int) -> dict[tuple[int, str], Offloaded]:
    """The offloaded states above for weights of `value` bytes (2 bf16/fp16, 4 fp32); 16 = the fp32 master,
    its fp32 gradient and the two moments. At the step, measured on 2 CPU ranks: bf16 holds the weights and the
    fp32 cast of the gradient partition (value + 4/d); fp32 ZeRO-1 keeps its full gradients through the step,
    and fp32 ZeRO-2 holds 8 bytes per parameter at d = 2, written here as 4 + 8/d (which part is sharded is
    not resolved by two ranks)."""
    optimizer = 4 * FP32_BYTES
    down_up = FP32_BYTES + value  # fp32 gradients down at the boundary, updated weights up
    accumulate = 2 * value  # a micro-batch's gradients down, the running sum back up
    half = value < FP32_BYTES
    return {
        (1, OFFLOAD_OPTIMIZER): Offloaded(
            PerParam(2 * value),
            PerParam(0, optimizer + value),
            0,
            down_up,
            device_step=PerParam(value, FP32_BYTES) if half else None,
        ),
        (2, OFFLOAD_OPTIMIZER): Offloaded(
            PerParam(value),
            PerParam(0, optimizer + 2 * value),
            accumulate,
            down_up,
            device_step=PerParam(value, FP32_BYTES if half else 2 * FP32_BYTES),
        ),
        (3, OFFLOAD_OPTIMIZER): Offloaded(PerParam(0, value), PerParam(0, optimizer + value), accumulate, down_up),
        (3, OFFLOAD_PARAMS): Offloaded(
            PerParam(), PerParam(0, optimizer + 2 * value), accumulate, FP32_BYTES, fetch_bytes=value
        ),
    }


_OFFLOADED = {
    (p, z, m): o for p, value in (("bf16", 2), ("fp16", 2), ("fp32", 4)) for (z, m), o in _offloaded(value).items()
}

DEEPSPEED_ACCOUNTING = Accounting(
    name="deepspeed",
    source="DeepSpeed 0.19.8 runtime/fp16/fused_optimizer.py, runtime/bf16_optimizer.py, "
    "runtime/zero/stage_1_and_2.py, runtime/zero/stage3.py; measured on CPU ranks",
    states={(p, z): rows[z][0] for p, rows in _TABLES.items() for z in rows},
    step={(p, z): rows[z][1] for p, rows in _TABLES.items() for z in rows},
    pipelined_states={**{(p, 0): PerParam(6.0, 12.0) for p in ("bf16", "fp16")}, ("bf16", 1): PerParam(8.0, 12.0)},
    pipelined_step={**{(p, 0): PerParam(6.0, 16.0) for p in ("bf16", "fp16")}, ("bf16", 1): PerParam(8.0, 16.0)},
    pipelined_allreduce={("bf16", 0): 2.0, ("bf16", 1): FP32_BYTES},
    pipelined_buffer_elements={1: 2 * ZERO0_ALLREDUCE_CHUNK},  # fp32 chunks, in bf16 elements
    # The engine adds each micro-batch's gradients into its buffers: read, read, write in the model's dtype.
    grad_accumulation_traffic={"bf16": 6.0, "fp16": 6.0, "fp32": 12.0},
    buffer_elements={0: ZERO0_ALLREDUCE_CHUNK, 3: STAGE3_MAX_LIVE_PARAMETERS},
    loss_backward_bytes_per_logit=LOSS_BACKWARD_BYTES_PER_LOGIT,
    offloaded=_OFFLOADED,
    buffer_hidden_squares={
        1: 3 * REDUCE_BUCKET_PER_HIDDEN_SQUARE,
        2: 3 * REDUCE_BUCKET_PER_HIDDEN_SQUARE,
        3: REDUCE_BUCKET_PER_HIDDEN_SQUARE + PREFETCH_BUCKET_PER_HIDDEN_SQUARE,
    },
)

DEEPSPEED = Capability(
    name="deepspeed",
    description="DeepSpeed 0.19: no TP, one ZeRO stage (2/3 only without pipeline) with CPU offload or ZeRO++, "
    "uniform checkpointing",
    tp_degrees=(1,),
    zero_stages=(0, 1, 2, 3),
    recompute_modes=("none", "full"),
    uniform_tp=True,
    uniform_zero=True,
    uniform_recompute=True,
    max_zero_with_pipeline=1,
    reasons={
        "tp_degrees": "DeepSpeed has no tensor parallelism of its own (a PipelineModule's layers would have to "
        "be TP-sharded by Megatron-DeepSpeed)",
        "max_zero_with_pipeline": "DeepSpeed's pipeline engine asserts \"ZeRO-2 and ZeRO-3 are incompatible with "
        'pipeline parallelism" (deepspeed/runtime/pipe/engine.py)',
        "recompute_modes": "DeepSpeed checkpoints whole layers (activation_checkpoint_interval), not modules",
        "fp8": "DeepSpeed's JSON config has no FP8 or FP4: such GEMMs come from the model's own code (Transformer "
        "Engine's layers and fp8_autocast), which a config cannot switch on",
    },
    fp8=False,
    accounting=DEEPSPEED_ACCOUNTING,
    vocab_multiple=1,  # the user's model as it is built: DeepSpeed pads nothing
    offload_modes=OFFLOAD_MODES,
    zeropp=True,
)
