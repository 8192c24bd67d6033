"""DeepSpeed adapter: capability, plan -> DeepSpeed config (merged into the user's), explicit pipeline partitions.

`uniap_deepspeed.plan_config(model, base=..., ...)` is the one-call entry for training scripts; it is
imported on first use, so importing the package (e.g. for uniap_deepspeed.pipeline) stays light.
"""

from typing import Any

LAZY = ("plan_config", "deepspeed_config", "plan_for_deepspeed")


def __getattr__(name: str) -> Any:
    if name in LAZY:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'uniap_deepspeed' has no attribute {name!r}")
