"""What Megatron-LM (core_v0.16.1) can run, declared once for the core's planner.

- one TP degree for every layer (`--tensor-model-parallel-size`), DP = world / (TP * PP);
- ZeRO: none, the distributed optimizer (ZeRO-1), or Megatron-FSDP (ZeRO-3, optim_grads_params) only
  with PP = 1 (0.16.1 does not assert that for Megatron-FSDP; torch FSDP2 does, and uniap keeps the
  stricter rule);
- one recompute setting for all transformer layers (`--recompute-granularity full --recompute-method
  uniform --recompute-num-layers 1`, or selective);
- heads, query groups and FFN divisible by TP (checked by the core's strategy enumeration).
"""
from uniap.cost.strategy import Capability

MEGATRON = Capability(
    name="megatron",
    description="Megatron-LM core_v0.16.1: one TP degree, distributed optimizer (ZeRO-1) or FSDP2 at PP=1, "
                "uniform recompute",
    zero_stages=(0, 1, 3),
    recompute_modes=("none", "selective", "full"),
    uniform_tp=True,
    uniform_zero=True,
    uniform_recompute=True,
    max_zero_with_pipeline=1,
    reasons={
        "zero_stages": "Megatron-LM shards optimizer states (--use-distributed-optimizer, ZeRO-1) or everything "
                       "(--use-torch-fsdp2, ZeRO-3), nothing in between",
        "max_zero_with_pipeline": "Megatron-LM's fully sharded data parallelism is run with one pipeline stage "
                                  "(--use-torch-fsdp2 asserts --pipeline-model-parallel-size 1 in validate_args)",
    },
)
