"""The process a DeepSpeed profiler or calibration run drives: deepspeed.comm, the accelerator and its
precision, agreements between ranks, and the AdamW section uniap's measurements step with. deepspeed and torch
are imported inside the functions, when something runs."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

from uniap.profile import collectives, harness
from uniap.profile.harness import Device

log = logging.getLogger("uniap.deepspeed.runtime")

# The AdamW the optimizer timing and the calibration run step with (a typical pretraining setting).
ADAMW_PARAMS: dict[str, Any] = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


@dataclass(frozen=True)
class Runtime:
    device_kind: str  # 'cuda', 'cpu', ...
    device: str  # torch device string of this rank
    dtype: Any  # compute dtype of layers and collectives
    ds_precision: str  # 'bf16', 'fp16' or 'fp32': the DeepSpeed config's precision section
    rank: int
    world_size: int

    @property
    def harness_device(self) -> Device:
        """This rank's device as uniap.profile.harness measures on it."""
        return Device(self.device, self.device_kind, accelerator().synchronize)


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def quiet_deepspeed(verbose: bool) -> None:
    with contextlib.suppress(ImportError, AttributeError):  # pragma: no cover - logging only
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)


def init_distributed() -> tuple[int, int, str]:
    """deepspeed.init_distributed with the accelerator's backend (gloo on the CPU accelerator unless
    oneCCL is installed); (rank, world size, backend)."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return dist.get_rank(), dist.get_world_size(), str(tdist.get_backend())


def runtime_of(precision: str) -> Runtime:
    import deepspeed.comm as dist
    import torch

    acc = accelerator()
    kind = acc.device_name()
    device = acc.current_device_name() if kind != "cpu" else "cpu"
    ds_precision = "fp32"
    if kind != "cpu":
        if precision == "bf16" and acc.is_bf16_supported():
            ds_precision = "bf16"
        elif precision in ("bf16", "fp16") and acc.is_fp16_supported():
            ds_precision = "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ds_precision]
    return Runtime(kind, device, dtype, ds_precision, dist.get_rank(), dist.get_world_size())


def device_description() -> str:
    """The GPU's name, another accelerator's kind, or 'cpu (<processor>)'."""
    return harness.device_description(accelerator().device_name())


def free_cached_memory() -> None:
    gc.collect()
    accelerator().empty_cache()


def all_ranks_ok(ok: bool, rt: Runtime) -> bool:
    """uniap.profile.harness.all_ranks_ok through deepspeed.comm."""
    import deepspeed.comm as dist

    return harness.all_ranks_ok(ok, dist, rt.harness_device)


def max_over_ranks(value: float, rt: Runtime) -> float:
    """uniap.profile.harness.max_over_ranks through deepspeed.comm."""
    import deepspeed.comm as dist

    return harness.max_over_ranks(value, dist, rt.harness_device)


def node_layout(world: int) -> list[list[int]]:
    """uniap.profile.collectives.node_layout through deepspeed.comm."""
    import deepspeed.comm as dist

    return collectives.node_layout(dist, world)


# ==================================================================================================
# The optimizer section
# ==================================================================================================


@cache
def _fused_adam_problem(device_kind: str) -> str | None:
    """Why DeepSpeed's FusedAdam cannot step here (None when it can). On a GPU, FusedAdam is what an
    `"optimizer": {"type": "AdamW"}` section builds (DeepSpeed 0.19.8 deepspeed/runtime/engine.py
    get_optimizer_configuration); its op is prebuilt or JIT-compiled by FusedAdamBuilder().load(). On the CPU
    accelerator that op is a C++ build of its own (deepspeed/ops/op_builder/cpu/fused_adam.py), so the CPU
    path steps with torch.optim.AdamW (`torch_adam`) instead of paying for a compiler run."""
    if device_kind == "cpu":
        return "the CPU accelerator steps with torch.optim.AdamW (torch_adam)"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - a missing compiler or CUDA toolkit: whatever the build raises
        first = (str(exc).splitlines() or [""])[0]
        return f"DeepSpeed FusedAdam unavailable ({type(exc).__name__}: {first})"
    return None


def use_torch_adam(rt: Runtime) -> bool:
    """Whether the AdamW section needs `torch_adam` (FusedAdam does not load on some rank); all ranks agree."""
    problem = _fused_adam_problem(rt.device_kind)
    ok = all_ranks_ok(problem is None, rt)
    if not ok and rt.device_kind != "cpu" and rt.rank == 0:
        log.warning("%s; stepping with torch.optim.AdamW", problem or "FusedAdam failed on another rank")
    return not ok


def optimizer_section(torch_adam: bool) -> dict[str, Any]:
    """The DeepSpeed config's optimizer section uniap's measurements step with: AdamW with ADAMW_PARAMS,
    DeepSpeed's FusedAdam, or torch.optim.AdamW when `torch_adam` (DeepSpeed 0.19.8
    deepspeed/runtime/engine.py _configure_basic_optimizer)."""
    params = dict(ADAMW_PARAMS)
    if torch_adam:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def optimizer_name(engine) -> str:
    """What engine.step() runs: the basic optimizer and the precision wrapper DeepSpeed put around it."""
    import torch

    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    cls = type(basic)
    if cls.__name__ == "FusedAdam" and cls.__module__.startswith("deepspeed"):
        name = "DeepSpeed FusedAdam"
    elif isinstance(basic, torch.optim.Optimizer) and cls.__module__.startswith("torch.optim"):
        foreach = basic.defaults.get("foreach")
        if foreach is None:  # torch's default: foreach when every tensor is on a CUDA device
            foreach = all(p.is_cuda for group in basic.param_groups for p in group["params"])
        name = f"torch.optim.{cls.__name__} ({'foreach' if foreach else 'for-loop'})"
    else:
        name = f"{cls.__module__}.{cls.__name__}"
    if engine.optimizer is not basic:
        name += f" in DeepSpeed {type(engine.optimizer).__name__}"
    return name
