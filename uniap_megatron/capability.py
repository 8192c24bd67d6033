"""What Megatron-LM (core_v0.16.1) can run and how it keeps model states, declared once for the planner.

- one TP degree for every layer (`--tensor-model-parallel-size`), one CP degree (`--context-parallel-size`,
  sequence divisible by 2 * CP), DP = world / (TP * CP * PP); gradients are reduced and the distributed
  optimizer shards over DP x CP (megatron/core/distributed/distributed_data_parallel.py, the data-parallel
  group with_context_parallel=True);
- ZeRO: none, the distributed optimizer (ZeRO-1), or Megatron-FSDP (ZeRO-3, optim_grads_params) only
  with PP = 1 (0.16.1 does not assert that for Megatron-FSDP; torch FSDP2 does, and uniap keeps the
  stricter rule);
- interleaved 1F1B (`--num-virtual-stages-per-pipeline-rank`, or a layout of PP x v stages) with the number
  of micro-batches a multiple of PP (megatron-core pipeline_parallel/schedules.py); the search tries every
  count of chunks per rank up to MAX_VIRTUAL_STAGES that the layers and micro-batches allow (memory decides);
- communication overlaps: TP collectives with the GEMMs (--tp-comm-overlap, Transformer Engine's userbuffers;
  validate_args asserts sequence parallelism beside it) and the distributed optimizer's all-gather with the
  next forward (--overlap-param-gather beside --overlap-grad-reduce);
- one recompute setting for all transformer layers (`--recompute-granularity full --recompute-method
  uniform --recompute-num-layers 1`, or selective);
- heads, query groups and FFN divisible by TP (checked by the core's strategy enumeration);
- activations of some transformer layers offloaded to host memory (`--cpu-offloading-num-layers N`, which sets
  --cpu-offloading in validate_args, arguments.py 1236-1237) through Transformer Engine's cpu_offload context
  (transformer/transformer_block.py asserts TE): fewer layers than the model has, not with PP > 1, not with
  recompute (megatron-core 0.16.1 transformer/transformer_config.py 1137-1152).

Model states (Megatron Core developer guide, "Distributed Optimizer", bytes per parameter without / with
the distributed optimizer over d data-parallel ranks): bf16 params with fp32 gradients, Megatron-LM's
default for bf16 (megatron/training/arguments.py sets accumulate_allreduce_grads_in_fp32), 18 vs 6 + 12/d;
fp16 params and gradients 20 vs 4 + 16/d (the optimizer keeps an fp32 copy of the gradients); fp32 16 vs
8 + 8/d. Measured with megatron-core 0.16.1 on an H200 (bf16, distributed optimizer, d = 1): 10.0 bytes
per parameter before the first step, Adam's moments add 8 at it. Megatron-FSDP shards all of it.
Without Transformer Engine or Apex, megatron/core/optimizer/__init__.py falls back to torch.optim.AdamW
(foreach on a GPU), and gradients are added into the fp32 buffer by a hook after each micro-batch
(megatron/core/distributed/distributed_data_parallel.py): read 2 + read and write 4 + 4 bytes.
"""

from dataclasses import replace

from uniap.cost.accounting import Accounting, PerParam
from uniap.cost.strategy import MAX_VIRTUAL_STAGES, Capability
from uniap.model.spec import PARAM_GATHER_OVERLAP, TP_COMM_OVERLAP

MEGATRON_ACCOUNTING = Accounting(
    name="megatron",
    source="Megatron Core developer guide (Distributed Optimizer) and megatron-core 0.16.1 "
    "distributed/param_and_grad_buffer.py, optimizer/distrib_optimizer.py",
    states={
        ("bf16", 0): PerParam(18.0),
        ("bf16", 1): PerParam(6.0, 12.0),
        ("bf16", 3): PerParam(0.0, 18.0),
        ("fp16", 0): PerParam(20.0),
        ("fp16", 1): PerParam(4.0, 16.0),
        ("fp16", 3): PerParam(0.0, 20.0),
        ("fp32", 0): PerParam(16.0),
        ("fp32", 1): PerParam(8.0, 8.0),
        ("fp32", 3): PerParam(0.0, 16.0),
    },
    torch_adam_without_fused_kernels=True,
    grad_accumulation_traffic={"bf16": 10.0, "fp16": 6.0, "fp32": 12.0},
    fusable_grad_accumulation=True,
    fp32_grads=True,
)

MEGATRON = Capability(
    name="megatron",
    description="Megatron-LM core_v0.16.1: one TP and one CP degree, distributed optimizer (ZeRO-1) or FSDP at "
    "PP=1, uniform recompute",
    zero_stages=(0, 1, 3),
    recompute_modes=("none", "selective", "full"),
    cp_degrees=None,
    uniform_tp=True,
    uniform_zero=True,
    uniform_recompute=True,
    max_zero_with_pipeline=1,
    precision_aware_optimizer=True,
    virtual_stages=tuple(range(1, MAX_VIRTUAL_STAGES + 1)),
    overlaps=(TP_COMM_OVERLAP, PARAM_GATHER_OVERLAP),
    # --make-vocab-size-divisible-by's default (megatron/training/arguments.py; padded x TP in
    # megatron/training/tokenizer/tokenizer.py _vocab_size_with_padding)
    vocab_multiple=128,
    reasons={
        "zero_stages": "Megatron-LM shards optimizer states (--use-distributed-optimizer, ZeRO-1) or everything "
        "(--use-torch-fsdp2, ZeRO-3), nothing in between",
        "max_zero_with_pipeline": "Megatron-LM's fully sharded data parallelism is run with one pipeline stage "
        "(--use-torch-fsdp2 asserts --pipeline-model-parallel-size 1 in validate_args)",
        "activation_offload": "Megatron-LM offloads activations (--cpu-offloading-num-layers) with one pipeline "
        "stage and no recompute only (megatron-core 0.16.1 TransformerConfig)",
    },
    accounting=MEGATRON_ACCOUNTING,
    activation_offload=True,
)

# CUDA_DEVICE_MAX_CONNECTIONS before Blackwell (Megatron-LM core_v0.16.1 megatron/training/arguments.py
# validate_args): TP > 1 or CP > 1 without FSDP asserts it is "1"; Megatron-FSDP and torch FSDP2 assert it is
# not "1".
# A launcher sets what the plan needs (8 is CUDA's own default); under the plugin the ranks already run
# with a value, and it limits the plan.
CONNECTIONS_ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
TP_CONNECTIONS, FSDP_CONNECTIONS = "1", "8"
FSDP_ZERO = 3


def connections_suffice(need: str | None, have: str | None) -> bool:
    """Whether a launch with CUDA_DEVICE_MAX_CONNECTIONS `have` (None: unset) satisfies what a plan's environment
    asks (`need`: TP_CONNECTIONS, FSDP_CONNECTIONS, or None for no rule): 1 exactly, or anything but 1."""
    return need is None or (need == TP_CONNECTIONS) == (have == TP_CONNECTIONS)


MEGATRON_WITHOUT_FSDP = replace(
    MEGATRON,
    zero_stages=(0, 1),
    reasons={
        **MEGATRON.reasons,
        "zero_stages": f"with {CONNECTIONS_ENV}={TP_CONNECTIONS} Megatron-LM runs no FSDP (validate_args asserts "
        "it is not 1); the distributed optimizer (ZeRO-1) remains",
    },
)

# Megatron-LM core_v0.16.1 validate_args: Muon (--optimizer muon / dist_muon) runs without the distributed
# optimizer, FSDP and overlapped gradient reduction ("Muon optimizer does not support ... for now").
MUON = "muon"
MEGATRON_FOR_MUON = replace(
    MEGATRON,
    zero_stages=(0,),
    reasons={
        **MEGATRON.reasons,
        "zero_stages": "Megatron-LM's Muon optimizer runs without the distributed optimizer or FSDP (validate_args)",
    },
)


def megatron_capability(optimizer: str, connections_allow_fsdp: bool) -> Capability:
    """Megatron-LM's capability for this job's optimizer and launch environment."""
    if optimizer == MUON:
        return MEGATRON_FOR_MUON
    return MEGATRON if connections_allow_fsdp else MEGATRON_WITHOUT_FSDP
