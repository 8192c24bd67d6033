"""Test-only: let megatron-core 0.16.1 train on CPU processes joined by gloo.

megatron-core runs on CPU except at a few CUDA-only spots. `install()` redirects exactly those, in the
process that calls it (the per-rank program tests/megatron_train.py); the product never imports this.

1. `GlobalMemoryBuffer.get_tensor` (the attention score buffer, the sequence-parallel all-gather
   buffer) allocates on `torch.cuda.current_device()`: allocate on the CPU instead.
2. `CudaRNGStatesTracker.fork` swaps CUDA RNG states around dropout: a no-op. The caller must use zero
   dropout (then the forked RNG is never drawn from) and CPU weight initialization
   (`use_cpu_initialization=True`, which draws from torch's CPU generator and never forks).
3. The pipeline schedule and the p2p / tensor-parallel communication code call
   `torch.cuda.current_device()` for the device of buffers they allocate and `torch.cuda.synchronize()`
   around batched p2p; the no-pipelining and 1F1B schedules create one tensor with `device="cuda"`.
   `torch.cuda.current_device()` answers the CPU device, `torch.cuda.synchronize()` does nothing, and
   the schedules module sees a `torch` whose `zeros` maps `device="cuda"` to the CPU.
4. Without Transformer Engine or Apex, the local layer spec's norm is `WrappedTorchNorm`, which refuses
   sequence parallelism (TE's and Apex's norms support it by tagging their weights
   `sequence_parallel=True` so that `finalize_model_grads` all-reduces their gradients over TP). A norm
   is per token, so it computes the same on a sequence shard: build the torch norm and tag its
   parameters the same way.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import types
from functools import reduce

import torch

CPU = torch.device("cpu")
_installed = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return CPU
    return device


class _SchedulesTorch(types.ModuleType):
    """`torch` as the pipeline schedules module sees it: everything is torch's, except that tensors
    requested on "cuda" are made on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu_device(device), **kwargs)

    @staticmethod
    def ones(*args, device=None, **kwargs):
        return torch.ones(*args, device=_cpu_device(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu_device(device), **kwargs)


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """GlobalMemoryBuffer.get_tensor with the buffer on the CPU (same reuse rule as the original)."""
    required_len = reduce(operator.mul, tensor_shape, 1)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required_len:
        buf = self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype, device=CPU, requires_grad=False)
    return buf[0:required_len].view(*tensor_shape)


@contextlib.contextmanager
def _no_fork(self, name=None):
    yield


def _sequence_parallel_norm(original_new):
    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sp = bool(config.sequence_parallel)
        if sp:
            config = copy.copy(config)  # the same config without the refusal; nothing else changes
            config.sequence_parallel = False
        norm = original_new(cls, config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sp
        return norm

    return __new__


def install() -> None:
    """Apply the redirections (idempotent). Call before building any megatron-core model."""
    global _installed
    if _installed:
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mcore_utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    mcore_random.CudaRNGStatesTracker.fork = _no_fork
    torch.cuda.current_device = lambda: CPU
    torch.cuda.synchronize = lambda device=None: None
    schedules.torch = _SchedulesTorch()
    WrappedTorchNorm.__new__ = _sequence_parallel_norm(WrappedTorchNorm.__new__)
    _installed = True
