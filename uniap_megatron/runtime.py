"""The process a Megatron profiler or calibration run drives: torch.distributed, this rank's device, the seeded
RNGs, and on the CPU (tests) megatron-core 0.16.1's CUDA-only calls redirected. torch and megatron-core are
imported inside the functions, when something runs."""

from __future__ import annotations

import contextlib
import gc
import os

from uniap.profile import harness
from uniap.profile.harness import Device

SEED = 1234


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def init_distributed() -> tuple[int, int, str]:
    """torch.distributed with nccl on a GPU, gloo on the CPU; (rank, world size, backend)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if on_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if on_cuda() else "gloo")
    return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())


def current_device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if on_cuda() else "cpu"


def dtype_of(precision: str):
    import torch

    if not on_cuda():
        return torch.float32
    if precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision in ("bf16", "fp16"):
        return torch.float16
    return torch.float32


def harness_device() -> Device:
    """This rank's device as uniap.profile.harness measures on it."""
    return Device(current_device(), "cuda" if on_cuda() else "cpu", synchronize)


def device_description() -> str:
    """The GPU's name, or 'cpu (<processor>)'."""
    return harness.device_description(harness_device().kind)


def synchronize() -> None:
    if on_cuda():
        import torch

        torch.cuda.synchronize()


def free_cached_memory() -> None:
    gc.collect()
    if on_cuda():
        import torch

        torch.cuda.empty_cache()


def all_ranks_ok(ok: bool) -> bool:
    import torch.distributed as dist

    return harness.all_ranks_ok(ok, dist, harness_device())


def process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def seed_all() -> None:
    """The same weights and inputs on every rank; on a GPU also megatron-core's CUDA RNG tracker (TE's and
    the attention's dropout forks draw from it)."""
    import torch

    torch.manual_seed(SEED)
    if on_cuda():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(SEED)


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    return str(device).startswith("cuda")


@contextlib.contextmanager
def current_device_on_cpu():
    """Without CUDA, torch.cuda.current_device() answers 'cpu' inside; a no-op with CUDA. GPTModel's RoPE
    moves its frequencies to that device on every forward (megatron-core 0.16.1
    models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding.get_emb)."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = saved


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Without CUDA, let megatron-core 0.16.1's DDP and optimizers work on CPU tensors; a no-op with CUDA.

    They allocate with `device=torch.cuda.current_device()` or `device='cuda'`
    (distributed/param_and_grad_buffer.py _ParamAndGradBuffer, optimizer/optimizer.py
    MixedPrecisionOptimizer, optimizer/clip_grads.py, utils.py local_multi_tensor_l2_norm) and accept only
    parameters and gradients whose Tensor.type() is 'torch.cuda.*' (optimizer/distrib_optimizer.py,
    optimizer/clip_grads.py). Inside: torch.cuda.current_device() answers 'cpu', a CUDA `device=` of a
    torch function becomes the CPU, and Tensor.type() of a CPU tensor answers its CUDA name. Nothing else
    changes."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    from torch.overrides import TorchFunctionMode

    class CpuForCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _is_cuda_device(kwargs.get("device", "cpu")):
                kwargs = {**kwargs, "device": "cpu"}
            out = func(*args, **kwargs)
            if (
                func is torch.Tensor.type
                and len(args) == 1
                and not kwargs
                and isinstance(out, str)
                and out.startswith("torch.")
                and not out.startswith("torch.cuda.")
            ):
                out = "torch.cuda." + out[len("torch.") :]
            return out

    with current_device_on_cpu(), CpuForCuda():
        yield


def mcore_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001  # pragma: no cover - an install without metadata
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")
