"""What DeepSpeed 0.19 can run, declared once for the core's planner.

- no tensor parallelism (a plain model or a PipelineModule has no TP of its own);
- one ZeRO stage for the whole engine; ZeRO-2/3 only without pipeline parallelism (the pipeline engine
  asserts "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism");
- one activation-checkpointing setting for all transformer layers.
"""
from uniap.cost.strategy import Capability

DEEPSPEED = Capability(
    name="deepspeed",
    description="DeepSpeed 0.19: no TP, one ZeRO stage (2/3 only without pipeline), uniform checkpointing",
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
                                  "pipeline parallelism\" (deepspeed/runtime/pipe/engine.py)",
        "recompute_modes": "DeepSpeed checkpoints whole layers (activation_checkpoint_interval), not modules",
    },
)
