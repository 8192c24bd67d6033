"""The measuring harness both adapters' profilers time with: the device they drive, a timer, the timing loops
behind LayerTiming and OptimizerTiming, and the agreements between ranks.

Framework-neutral: the communication module (`torch.distributed`, or `deepspeed.comm` with the same API) and
the device come from the adapter; torch is imported inside the functions, only when something is measured.

What the loops measure, the one meaning of each field:
- `forward_ms`, `backward_ms`: the median over `repeats` iterations after `warmup` of one forward and of the
  backward of its output, per device (CUDA events on CUDA, perf_counter after a synchronize elsewhere);
- `activation_bytes` (CUDA only): allocated after the forward minus before it, what the forward leaves
  allocated for the backward (uniap.profile.schema.LayerTiming), the median, never below 0;
- `step_ms`: the median optimizer step of `repeats` after max(warmup, 1) (the first creates the moments);
- `extra_peak_bytes` (CUDA only): the most allocated during a step beyond what was allocated before it,
  the largest over the timed steps (uniap.profile.schema.OptimizerTiming);
- a whole training run's iterations (time_iterations, what a calibration run measures): wall-clock seconds per
  iteration between two synchronizes, after max(warmup, 1) untimed ones, and on CUDA the peak bytes reserved and
  allocated over the timed iterations above what the device held before the run was built (memory_in_use).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SpecError


T = TypeVar("T")
CPU_NOTE = "CPU timings: for testing the pipeline, not for planning GPU jobs"
ACTIVATION_NOTE = "activation_bytes = allocated after the forward minus before it (left for the backward)"


@dataclass(frozen=True)
class RunSchedule:
    """A whole-model training run's shape: `micro_batches` micro-batches of `micro_batch_size` per iteration,
    `iterations` timed after max(`warmup`, 1) untimed ones (time_iterations)."""

    micro_batch_size: int
    micro_batches: int
    warmup: int
    iterations: int

    def __post_init__(self) -> None:
        if min(self.micro_batch_size, self.micro_batches, self.iterations) < 1 or self.warmup < 0:
            raise SpecError("micro-batch size, micro-batches and iterations must be >= 1, warm-up >= 0")

    def __str__(self) -> str:
        return (
            f"micro-batch {self.micro_batch_size} x {self.micro_batches}, {self.iterations} iterations after "
            f"{max(self.warmup, 1)} warmup"
        )


@dataclass(frozen=True)
class Iterations:
    """What time_iterations measured: every iteration's loss (warm-up included), the timed iterations'
    seconds, the optimizer steps skipped among them (an fp16 loss scaler's), and on CUDA the peaks and what
    was allocated before the run was built."""

    losses: tuple[float, ...]
    seconds: tuple[float, ...]
    skipped_steps: int
    peak_reserved_bytes: float | None = None
    peak_allocated_bytes: float | None = None
    memory_before_bytes: float | None = None


@dataclass(frozen=True)
class Device:
    """This rank's device as the harness drives it: `name` the torch device its tensors live on ('cuda:0',
    'cpu', ...), `kind` 'cuda', 'cpu' or another accelerator's name, `synchronize` waits for its queued work."""

    name: str
    kind: str
    synchronize: Callable[[], None]

    @property
    def cuda(self) -> bool:
        """CUDA events time it and torch.cuda's allocator says what it holds."""
        return self.kind == "cuda"


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def device_description(kind: str) -> str:
    """The GPU's name on CUDA, another accelerator's kind, or 'cpu (<processor>)'."""
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    if kind != "cpu":
        return kind
    return f"cpu ({processor_name()})"


class Timer:
    """Durations in ms: CUDA events on CUDA (read after a synchronize), perf_counter after a synchronize
    elsewhere."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def mark(self):
        if self.device.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        self.device.synchronize()
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.device.cuda else (b - a) * 1e3


def all_ranks_ok(ok: bool, comm: Any, device: Device) -> bool:
    """Whether `ok` holds on every rank of `comm`'s world (every rank must call it)."""
    if comm.get_world_size() == 1:
        return ok
    import torch

    flag = torch.tensor([1.0 if ok else 0.0], device=device.name)
    comm.all_reduce(flag, op=comm.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def unless_out_of_memory(
    measure: Callable[[], T], agree: Callable[[bool], bool], cleanup: Callable[[], None] | None = None
) -> T | None:
    """`measure()`, or None where it ran out of device memory on any rank: every rank must call it, `agree(ok)`
    is all_ranks_ok through the framework's communication, and `cleanup()` runs after the measurement either
    way (before the ranks agree)."""
    import torch

    result, ok = None, True
    try:
        result = measure()
    except torch.OutOfMemoryError:
        ok = False
    finally:
        if cleanup is not None:
            cleanup()
    return result if agree(ok) else None


def optimizer_measured(timing, over: str, log, rank_zero: bool):
    """`timing` as a profiler keeps it: where unless_out_of_memory gave None, a warning that the step over
    `over` stays estimated; else logged on rank 0."""
    if timing is None:
        log.warning("the optimizer step over %s ran out of memory; it stays estimated", over)
    elif rank_zero:
        log.info("%s", optimizer_line(timing))
    return timing


def layer_line(signature: str, timing) -> str:
    """A layer timing as the profilers log it (-v)."""
    return (
        f"{signature:<60} tp {timing.tp} mbs {timing.micro_batch_size:3d}  fwd {timing.forward_ms:9.3f} ms  "
        f"bwd {timing.backward_ms:9.3f} ms"
    )


def optimizer_line(o) -> str:
    """An optimizer timing as the profilers report it."""
    extra = f", {o.extra_peak_bytes / 2**20:.1f} MiB extra at the step" if o.extra_peak_bytes is not None else ""
    return f"optimizer {o.implementation}: {o.step_ms:.3f} ms per step over {o.num_params:,} parameters{extra}"


def max_over_ranks(value: float, comm: Any, device: Device) -> float:
    """The largest `value` over `comm`'s world (every rank must call it): the slowest rank's time."""
    import torch

    t = torch.tensor([value], dtype=torch.float64 if device.kind == "cpu" else torch.float32, device=device.name)
    comm.all_reduce(t, op=comm.ReduceOp.MAX)
    return float(t.item())


def time_passes(
    forward: Callable[[], Any],
    backward: Callable[[Any], None],
    reset: Callable[[], None],
    warmup: int,
    repeats: int,
    device: Device,
) -> tuple[float, float, float | None]:
    """(forward_ms, backward_ms, activation_bytes) as the module docstring defines them. `forward()` returns
    what `backward(out)` back-propagates; `reset()` drops the previous iteration's gradients."""
    import torch

    timer = Timer(device)
    forward_ms, backward_ms, kept = [], [], []
    for i in range(warmup + repeats):
        reset()
        device.synchronize()
        before = torch.cuda.memory_allocated() if device.cuda else 0
        t0 = timer.mark()
        out = forward()
        t1 = timer.mark()
        after = torch.cuda.memory_allocated() if device.cuda else 0
        backward(out)
        t2 = timer.mark()
        device.synchronize()
        if i >= warmup:
            forward_ms.append(timer.ms(t0, t1))
            backward_ms.append(timer.ms(t1, t2))
            kept.append(after - before)
        del out
    activation = float(max(0, statistics.median(kept))) if device.cuda else None
    return statistics.median(forward_ms), statistics.median(backward_ms), activation


def time_steps(
    step: Callable[[], bool], warmup: int, repeats: int, device: Device, prepare: Callable[[], None] | None = None
) -> tuple[float, float | None]:
    """(step_ms, extra_peak_bytes) as the module docstring defines them. `step()` steps and says whether the
    step counts (one the fp16 loss scaler skips does not); `prepare()`, when given, runs untimed before each
    step (the forward and backward that leave its gradients). RuntimeError when no timed step counted."""
    import torch

    timer = Timer(device)
    warm = max(warmup, 1)
    times, extras = [], []
    for i in range(warm + repeats):
        if prepare is not None:
            prepare()
        device.synchronize()
        before = 0
        if device.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = timer.mark()
        counts = step()
        t1 = timer.mark()
        device.synchronize()
        if i >= warm and counts:
            times.append(timer.ms(t0, t1))
            if device.cuda:
                extras.append(torch.cuda.max_memory_allocated() - before)
    if not times:
        raise RuntimeError("every timed optimizer step was skipped by the loss scaler")
    return statistics.median(times), float(max(0, max(extras))) if extras else None


def memory_in_use(device: Device) -> tuple[float, float] | None:
    """(allocated, reserved) bytes on CUDA now, None elsewhere: what a run's peaks are counted above."""
    if not device.cuda:
        return None
    import torch

    return float(torch.cuda.memory_allocated()), float(torch.cuda.memory_reserved())


def time_iterations(
    iteration: Callable[[], tuple[float, bool]],
    schedule: RunSchedule,
    device: Device,
    before: tuple[float, float] | None = None,
) -> Iterations:
    """A training run's iterations as the module docstring defines them: `iteration()` runs one (every
    micro-batch, the optimizer step) and returns its loss and whether its step counted; `before` is
    memory_in_use from before the run's model was built."""
    import torch

    warm = max(schedule.warmup, 1)
    losses: list[float] = []
    seconds: list[float] = []
    skipped = 0
    for i in range(warm + schedule.iterations):
        device.synchronize()
        if i == warm and device.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, counted = iteration()
        device.synchronize()
        elapsed = time.perf_counter() - t0
        losses.append(loss)
        if i >= warm:
            seconds.append(elapsed)
            skipped += 0 if counted else 1
    if not device.cuda or before is None:
        return Iterations(tuple(losses), tuple(seconds), skipped)
    allocated = float(torch.cuda.max_memory_allocated()) - before[0]
    reserved = float(torch.cuda.max_memory_reserved()) - before[1]
    return Iterations(tuple(losses), tuple(seconds), skipped, reserved, allocated, before[0])
