"""What Megatron-LM (core_v0.16.1) can run, declared once for the core's planner.

- one TP degree for every layer (`--tensor-model-parallel-size`), DP = world / (TP * PP);
- ZeRO: none, the distributed optimizer (ZeRO-1), or torch FSDP2 (ZeRO-3) only with PP = 1;
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
        "max_zero_with_pipeline": "--use-torch-fsdp2 requires --pipeline-model-parallel-size 1 (validate_args)",
    },
)
