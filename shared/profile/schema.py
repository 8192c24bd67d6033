"""Measured profiles: versioned JSON written by the adapters' profilers, read by the cost model.

A profile holds what was measured on a real cluster: per layer signature, forward/backward time (and
optionally activation memory) per TP degree and micro-batch size; bus bandwidth of collectives per
group size inside a node and across nodes; P2P bandwidth; the compute/communication overlap
coefficient. Anything missing falls back to the analytic estimate (profile.estimate), and every
output says which basis each number has.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProfileError
from ..io import read_text, write_json_atomic

PROFILE_FORMAT = "uniap-profile"
PROFILE_VERSION = 1
SCOPES = ("intra_node", "inter_node")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


def bus_factor(op: str, group: int) -> float:
    """NCCL-tests' bus-bandwidth factor: bus bandwidth = (bytes of the full tensor / time) x factor, and
    a ring collective takes factor x bytes / bus bandwidth. The profilers measure with it, the cost
    model prices with it."""
    return {"all_reduce": 2.0 * (group - 1) / group, "all_gather": (group - 1) / group,
            "reduce_scatter": (group - 1) / group, "all_to_all": (group - 1) / group, "p2p": 1.0}[op]


@dataclass(frozen=True)
class LayerTiming:
    """One measurement of one layer signature at (tp, micro_batch_size): per-device times in ms."""

    tp: int
    micro_batch_size: int
    forward_ms: float
    backward_ms: float
    activation_bytes: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tp, int) and self.tp > 0 and isinstance(self.micro_batch_size, int)
                and self.micro_batch_size > 0):
            raise ProfileError(f"corrupt profile: layer timing has tp={self.tp!r}, "
                               f"micro_batch_size={self.micro_batch_size!r} (positive integers required)")
        for name in ("forward_ms", "backward_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0 or v != v or v == float("inf"):
                raise ProfileError(f"corrupt profile: layer timing field '{name}' = {v!r} (a finite number >= 0)")


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

    def __post_init__(self) -> None:
        if self.overlap_coefficient is not None and not (1.0 <= self.overlap_coefficient <= 2.0):
            raise ProfileError(f"corrupt profile: overlap_coefficient {self.overlap_coefficient!r} "
                               f"(1 = perfect overlap, 2 = none)")

    # --- lookups ----------------------------------------------------------------------------------

    def layer_times(self, signature: str, tp: int, micro_batch_size: float) -> tuple[float, float] | None:
        """(forward, backward) seconds at this tp and micro-batch size: exact, or a linear fit in the
        micro-batch size over the measured points at this tp; None when nothing was measured."""
        points = sorted((t for t in self.layers.get(signature, ()) if t.tp == tp), key=lambda t: t.micro_batch_size)
        if not points:
            return None
        for t in points:
            if t.micro_batch_size == micro_batch_size:
                return t.forward_ms / 1e3, t.backward_ms / 1e3
        if len(points) == 1:
            scale = micro_batch_size / points[0].micro_batch_size
            return points[0].forward_ms * scale / 1e3, points[0].backward_ms * scale / 1e3
        xs = [p.micro_batch_size for p in points]
        return (_linear_fit(xs, [p.forward_ms for p in points], micro_batch_size) / 1e3,
                _linear_fit(xs, [p.backward_ms for p in points], micro_batch_size) / 1e3)

    def bus_bandwidth(self, op: str, group_size: int, scope: str) -> float | None:
        """GB/s measured for `op` at the nearest group size in `scope`; all-gather, reduce-scatter and
        all-to-all fall back to the all-reduce measurement; None when nothing fits."""
        for candidate in ((op,) if op in ("p2p", "all_reduce") else (op, "all_reduce")):
            rows = [c for c in self.collectives if c.op == candidate and c.scope == scope]
            if rows:
                return min(rows, key=lambda c: (abs(c.group_size - group_size), -c.group_size)).bus_bandwidth_gbps
        return None

    # --- JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "device": self.device,
                "runtime": self.runtime, "backend": self.backend, "notes": self.notes,
                "overlap_coefficient": self.overlap_coefficient,
                "layers": {sig: [asdict(t) for t in ts] for sig, ts in self.layers.items()},
                "collectives": [asdict(c) for c in self.collectives]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{source} is not a uniap profile (no \"format\": \"{PROFILE_FORMAT}\")",
                               "write it with `uniap-megatron profile` or `uniap-deepspeed profile`")
        version = data.get("version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"{source} has profile version {version!r}; this uniap reads version {PROFILE_VERSION}",
                               "re-run the profiler with this uniap version")
        try:
            layers = {str(sig): [LayerTiming(**t) for t in ts] for sig, ts in (data.get("layers") or {}).items()}
            collectives = [CollectiveBandwidth(**c) for c in data.get("collectives") or []]
            return cls(device=str(data.get("device", "")), runtime=str(data.get("runtime", "")), layers=layers,
                       collectives=collectives, overlap_coefficient=data.get("overlap_coefficient"),
                       backend=str(data.get("backend", "")), notes=str(data.get("notes", "")))
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc.message}", exc.hint) from None
        except (TypeError, AttributeError) as exc:
            raise ProfileError(f"corrupt profile {source}: {exc}",
                               "re-run the profiler; do not edit the file by hand") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            data = json.loads(read_text(path, "profile", ProfileError))
        except json.JSONDecodeError as exc:
            raise ProfileError(f"corrupt profile {path}: not valid JSON ({exc.msg} at line {exc.lineno})",
                               "re-run the profiler; the file may have been truncated") from None
        return cls.from_dict(data, source=str(path))


def _linear_fit(xs: list[float], ys: list[float], x: float) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / var
    return max(0.0, my + slope * (x - mx))
