"""Measured profiles: versioned JSON written by the adapters' profilers and `uniap calibrate`, read by the
cost model.

A profile holds what was measured on a real cluster: per layer signature, forward/backward time and the
activation memory per TP degree and micro-batch size; bus bandwidth of collectives per group size inside
a node and across nodes; P2P bandwidth; the compute/communication overlap coefficient; and one optimizer
step; a calibration fitted to whole training iterations (time per iteration, peak memory) that scales what the
per-layer sum misses. Anything missing falls back to the analytic estimate, and every output says which
basis each number has. Version 2 added the optimizer step and the calibration; version 1 files are
still read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProfileError
from ..io import read_text, write_json_atomic

PROFILE_FORMAT = "uniap-profile"
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCOPES = ("intra_node", "inter_node")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


def bus_factor(op: str, group: int) -> float:
    """NCCL-tests' bus-bandwidth factor: bus bandwidth = (bytes of the full tensor / time) x factor, and
    a ring collective takes factor x bytes / bus bandwidth. The profilers measure with it, the cost
    model prices with it."""
    return {
        "all_reduce": 2.0 * (group - 1) / group,
        "all_gather": (group - 1) / group,
        "reduce_scatter": (group - 1) / group,
        "all_to_all": (group - 1) / group,
        "p2p": 1.0,
    }[op]


@dataclass(frozen=True)
class LayerTiming:
    """One measurement of one layer signature at (tp, micro_batch_size): per-device times in ms, and
    `activation_bytes`: what the forward leaves allocated for the backward (allocated after the forward
    minus before it), the quantity the cost model calls a layer's activations."""

    tp: int
    micro_batch_size: int
    forward_ms: float
    backward_ms: float
    activation_bytes: float | None = None

    def __post_init__(self) -> None:
        if not (
            isinstance(self.tp, int)
            and self.tp > 0
            and isinstance(self.micro_batch_size, int)
            and self.micro_batch_size > 0
        ):
            raise ProfileError(
                f"corrupt profile: layer timing has tp={self.tp!r}, "
                f"micro_batch_size={self.micro_batch_size!r} (positive integers required)"
            )
        for name in ("forward_ms", "backward_ms"):
            v = getattr(self, name)
            if not _finite_nonnegative(v):
                raise ProfileError(f"corrupt profile: layer timing field '{name}' = {v!r} (a finite number >= 0)")
        if self.activation_bytes is not None and not _finite_nonnegative(self.activation_bytes):
            raise ProfileError(f"corrupt profile: activation_bytes = {self.activation_bytes!r} (a finite number >= 0)")


@dataclass(frozen=True)
class OptimizerTiming:
    """One optimizer step measured over `num_params` parameters, all on this device (the optimizer-local
    parameters of the cost model): its time and the memory it allocates beyond what was allocated before
    it (temporaries; the first step's lazily created moments excluded). `implementation` names it, e.g.
    'torch.optim.AdamW (foreach)', 'Transformer Engine FusedAdam', 'DeepSpeed FusedAdam'."""

    implementation: str
    num_params: int
    step_ms: float
    extra_peak_bytes: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.num_params, int) and self.num_params > 0):
            raise ProfileError(f"corrupt profile: optimizer num_params {self.num_params!r} (a positive integer)")
        if not _finite_nonnegative(self.step_ms):
            raise ProfileError(f"corrupt profile: optimizer step_ms {self.step_ms!r} (a finite number >= 0)")
        if self.extra_peak_bytes is not None and not _finite_nonnegative(self.extra_peak_bytes):
            raise ProfileError(f"corrupt profile: optimizer extra_peak_bytes {self.extra_peak_bytes!r}")


@dataclass(frozen=True)
class CalibrationRun:
    """One whole-model training run measured against its prediction: what ran (`job`: the plan's model,
    cluster, training and strategy in the plan JSON's terms), the measured time per iteration and peak
    memory, and what the cost model predicted before and after the fit."""

    label: str
    job: dict[str, Any]
    measured_time_s: float
    predicted_time_s: float
    fitted_time_s: float
    measured_peak_bytes: float | None = None
    predicted_peak_bytes: float | None = None
    fitted_peak_bytes: float | None = None
    memory_kind: str = "reserved"

    def __post_init__(self) -> None:
        for name in ("measured_time_s", "predicted_time_s", "fitted_time_s"):
            if not _finite_positive(getattr(self, name)):
                raise ProfileError(f"corrupt profile: calibration run field '{name}' = {getattr(self, name)!r}")
        if self.memory_kind not in ("reserved", "allocated"):
            raise ProfileError(f"corrupt profile: calibration memory_kind {self.memory_kind!r} (reserved or allocated)")


@dataclass(frozen=True)
class Calibration:
    """Coefficients fitted to whole-iteration measurements: `compute_scale` multiplies every layer's compute
    time (what the per-layer sum misses: kernels of the real model, framework work per micro-batch);
    `reserved_per_allocated` turns predicted allocated bytes into the peak the allocator reserves
    (fragmentation and whatever the memory model misses). `runs` are the measurements behind them."""

    compute_scale: float = 1.0
    reserved_per_allocated: float | None = None
    runs: tuple[CalibrationRun, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not _finite_positive(self.compute_scale) or not 0.2 <= self.compute_scale <= 5.0:
            raise ProfileError(f"corrupt profile: calibration compute_scale {self.compute_scale!r} (0.2 .. 5)")
        r = self.reserved_per_allocated
        if r is not None and (not _finite_positive(r) or not 0.5 <= r <= 3.0):
            raise ProfileError(f"corrupt profile: calibration reserved_per_allocated {r!r} (0.5 .. 3)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute_scale": self.compute_scale,
            "reserved_per_allocated": self.reserved_per_allocated,
            "source": self.source,
            "runs": [asdict(r) for r in self.runs],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration":
        if not isinstance(data, dict):
            raise ProfileError(f"corrupt profile: calibration must be a mapping, not {type(data).__name__}")
        runs = tuple(CalibrationRun(**r) for r in data.get("runs") or ())
        return cls(
            compute_scale=data.get("compute_scale", 1.0),
            reserved_per_allocated=data.get("reserved_per_allocated"),
            runs=runs,
            source=str(data.get("source", "")),
        )


@dataclass(frozen=True)
class CollectiveBandwidth:
    """Bus bandwidth (GB/s, NCCL-tests convention) of `op` over `group_size` ranks in `scope`."""

    op: str
    group_size: int
    scope: str
    bus_bandwidth_gbps: float

    def __post_init__(self) -> None:
        if self.op not in COLLECTIVES:
            raise ProfileError(f"corrupt profile: collective op '{self.op}' (known: {', '.join(COLLECTIVES)})")
        if self.scope not in SCOPES:
            raise ProfileError(f"corrupt profile: collective scope '{self.scope}' (known: {', '.join(SCOPES)})")
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            raise ProfileError(f"corrupt profile: collective group_size {self.group_size!r} (an integer >= 2)")
        v = self.bus_bandwidth_gbps
        if not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ProfileError(f"corrupt profile: bus_bandwidth_gbps {v!r} (a finite number > 0)")


@dataclass
class Profile:
    """What was measured; `device` and `runtime` say where (e.g. 'NVIDIA H100', 'megatron-core 0.16.1')."""

    device: str
    runtime: str
    layers: dict[str, list[LayerTiming]] = field(default_factory=dict)
    collectives: list[CollectiveBandwidth] = field(default_factory=list)
    overlap_coefficient: float | None = None
    backend: str = ""
    notes: str = ""
    optimizer: OptimizerTiming | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.overlap_coefficient is not None and not (1.0 <= self.overlap_coefficient <= 2.0):
            raise ProfileError(
                f"corrupt profile: overlap_coefficient {self.overlap_coefficient!r} (1 = perfect overlap, 2 = none)"
            )

    # --- lookups ----------------------------------------------------------------------------------

    def layer_times(self, signature: str, tp: int, micro_batch_size: float) -> tuple[float, float] | None:
        """(forward, backward) seconds at this tp and micro-batch size (interpolated between measured sizes,
        see _interpolate); None when nothing was measured at this tp."""
        points = self._points(signature, tp)
        if not points:
            return None
        xs = [p.micro_batch_size for p in points]
        return (
            _interpolate(xs, [p.forward_ms for p in points], micro_batch_size) / 1e3,
            _interpolate(xs, [p.backward_ms for p in points], micro_batch_size) / 1e3,
        )

    def layer_activation_bytes(self, signature: str, tp: int, micro_batch_size: float) -> float | None:
        """Measured activation bytes at this tp and micro-batch size (interpolated), or None."""
        points = [p for p in self._points(signature, tp) if p.activation_bytes is not None]
        if not points:
            return None
        return _interpolate(
            [p.micro_batch_size for p in points], [p.activation_bytes for p in points], micro_batch_size
        )

    def _points(self, signature: str, tp: int) -> list[LayerTiming]:
        return sorted((t for t in self.layers.get(signature, ()) if t.tp == tp), key=lambda t: t.micro_batch_size)

    def bus_bandwidth(self, op: str, group_size: int, scope: str) -> float | None:
        """GB/s measured for `op` at the nearest group size in `scope`; all-gather, reduce-scatter and
        all-to-all fall back to the all-reduce measurement; None when nothing fits."""
        for candidate in (op,) if op in ("p2p", "all_reduce") else (op, "all_reduce"):
            rows = [c for c in self.collectives if c.op == candidate and c.scope == scope]
            if rows:
                return min(rows, key=lambda c: (abs(c.group_size - group_size), -c.group_size)).bus_bandwidth_gbps
        return None

    # --- JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "device": self.device,
            "runtime": self.runtime,
            "backend": self.backend,
            "notes": self.notes,
            "overlap_coefficient": self.overlap_coefficient,
            "layers": {sig: [asdict(t) for t in ts] for sig, ts in self.layers.items()},
            "collectives": [asdict(c) for c in self.collectives],
            "optimizer": asdict(self.optimizer) if self.optimizer else None,
            "calibration": self.calibration.to_dict() if self.calibration else None,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f'{source} is not a uniap profile (no "format": "{PROFILE_FORMAT}")',
                "write it with `uniap-megatron profile` or `uniap-deepspeed profile`",
            )
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ProfileError(
                f"{source} has profile version {version!r}; this uniap reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                "re-run the profiler with this uniap version",
            )
        try:
            layers = {str(sig): [LayerTiming(**t) for t in ts] for sig, ts in (data.get("layers") or {}).items()}
            collectives = [CollectiveBandwidth(**c) for c in data.get("collectives") or []]
            calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") else None
            optimizer = OptimizerTiming(**data["optimizer"]) if data.get("optimizer") else None
            return cls(
                device=str(data.get("device", "")),
                runtime=str(data.get("runtime", "")),
                layers=layers,
                collectives=collectives,
                overlap_coefficient=data.get("overlap_coefficient"),
                backend=str(data.get("backend", "")),
                notes=str(data.get("notes", "")),
                optimizer=optimizer,
                calibration=calibration,
            )
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc.message}", exc.hint) from None
        except (TypeError, AttributeError) as exc:
            raise ProfileError(
                f"corrupt profile {source}: {exc}", "re-run the profiler; do not edit the file by hand"
            ) from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            data = json.loads(read_text(path, "profile", ProfileError))
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"corrupt profile {path}: not valid JSON ({exc.msg} at line {exc.lineno})",
                "re-run the profiler; the file may have been truncated",
            ) from None
        except RecursionError:
            raise ProfileError(f"corrupt profile {path}: its values nest too deeply") from None
        return cls.from_dict(data, source=str(path))


def _finite_nonnegative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _finite_positive(v: Any) -> bool:
    return _finite_nonnegative(v) and v > 0


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """y at x from measurements at sorted sizes xs: exact, linear between neighbours, and outside the
    measured range the nearest segment's line, kept between proportional scalings of the nearest
    point (the time per sample never rises with the micro-batch, and falls at most to the segment's
    slope). One point scales proportionally."""
    if x in xs:
        return ys[xs.index(x)]
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    if x < xs[0]:
        (x0, y0), (x1, y1) = (xs[0], ys[0]), (xs[1], ys[1])
        line = y0 + (y1 - y0) / (x1 - x0) * (x - x0)
        return min(max(line, y0 * x / x0), y0)
    if x > xs[-1]:
        (x0, y0), (x1, y1) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
        line = y1 + (y1 - y0) / (x1 - x0) * (x - x1)
        return max(min(line, y1 * x / x1), y1)
    i = next(k for k in range(1, len(xs)) if xs[k] > x)
    (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
