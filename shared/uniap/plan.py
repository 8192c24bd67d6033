"""The Plan: what the planner chose and what it predicts, as JSON the adapters translate.

Named after the paper's quantities: pipeline degree `deg`, micro-batch count `c`, the placement
(layer -> stage) and each layer's intra-layer strategy; predicted time per iteration (TPI) and its
per-stage parts; the basis of every number (measured profile or analytic estimate); the solver's
status, gap and time per subproblem.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .cost.evaluate import Prediction
from .cost.model import CALIBRATED, ESTIMATED, MEASURED
from .cluster.spec import ClusterSpec
from .cost.strategy import NO_PINS, Pins, Strategy
from .cost.tables import Subproblem
from .errors import SpecError
from .io import read_text, write_json_atomic
from .model.graph import TRANSFORMER_KINDS
from .model.spec import ModelSpec, TrainingSpec

PLAN_FORMAT = "uniap-plan"
PLAN_VERSION = 5
# Version 2 added each stage's memory breakdown; version 3 renamed micro_batch -> micro_batch_all_replicas
# and the pin micro_batch_size -> micro_batch_per_replica; version 4 added virtual_stages (interleaved
# pipelines; older plans have one chunk per rank) and each strategy's cp; version 5 each strategy's ZeRO variant
# (offload, zeropp) and each stage's host_bytes.
READABLE_VERSIONS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str
    stage: int
    strategy: Strategy


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage (a model chunk of rank index % pipeline_degree when interleaved): its layers, time per
    micro-batch, once-per-iteration time, and memory per GPU of its rank: `memory_bytes` is the predicted peak
    the allocator reserves; the rest are allocated bytes (model states, in-flight activations, peaks while
    computing, the states at the optimizer step with its temporaries, offloaded states in host memory)."""

    index: int
    first_layer: str
    last_layer: str
    num_layers: int
    time_per_microbatch: float
    time_per_iteration_extra: float
    memory_bytes: float
    states_bytes: float | None = None
    activation_bytes: float | None = None
    transient_bytes: float | None = None
    step_bytes: float | None = None
    host_bytes: float | None = None  # offloaded states in host memory per GPU (absent: none)


@dataclass
class Plan:
    """A parallelization plan with its predicted performance, for the job its specs describe.

    `micro_batches` is the paper's c (micro-batches per iteration, Megatron's accumulation steps x the
    pipeline's); `micro_batch_all_replicas` = global batch / c is the samples of one pipeline micro-batch
    over all data-parallel replicas of a stage together; `micro_batch_per_replica` is what each replica
    computes (Megatron's --micro-batch-size, DeepSpeed's train_micro_batch_size_per_gpu). `virtual_stages`
    is the model chunks per pipeline rank (Megatron's --num-virtual-stages-per-pipeline-rank; 1: plain 1F1B):
    the layers sit on pipeline_degree x virtual_stages stages, stage i on rank i % pipeline_degree."""

    target: str
    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    pipeline_degree: int
    micro_batches: int
    micro_batch_all_replicas: int
    devices_per_stage: int
    layers: list[LayerPlan]
    stages: list[StagePlan]
    boundary_time: list[float]
    time_per_iteration: float
    samples_per_second: float
    tokens_per_second: float
    mfu: float
    memory_capacity_bytes: float
    basis: dict[str, str]
    solver: dict[str, Any] = field(default_factory=dict)
    pins: Pins = NO_PINS
    reserved_per_allocated: float | None = None
    virtual_stages: int = 1
    notes: list[str] = field(default_factory=list)  # what the planner wants the user to know about its choice

    def __post_init__(self) -> None:
        for name, kind in (("model", ModelSpec), ("cluster", ClusterSpec), ("training", TrainingSpec), ("pins", Pins)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"Plan.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if min(self.pipeline_degree, self.micro_batches, self.micro_batch_all_replicas, self.virtual_stages) < 1:
            raise SpecError(
                "invalid plan: pipeline_degree, virtual_stages, micro_batches and micro_batch_all_replicas must be >= 1"
            )
        if self.micro_batch_all_replicas * self.micro_batches != self.training.global_batch_size:
            raise SpecError("invalid plan: micro_batch_all_replicas * micro_batches must equal the global batch size")
        if self.num_stages > len(self.layers) or {lp.stage for lp in self.layers} != set(range(self.num_stages)):
            raise SpecError("invalid plan: every stage must hold at least one layer")
        if len(self.stages) != self.num_stages:
            raise SpecError("invalid plan: one stage entry per pipeline stage is required")

    # --- views the adapters use -------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        """Stages the layers are placed on: pipeline ranks x model chunks per rank."""
        return self.pipeline_degree * self.virtual_stages

    @property
    def uniform_strategy(self) -> Strategy | None:
        """The strategy shared by every transformer layer, if there is one (Megatron, DeepSpeed), whichever of
        them keep their activations in host memory (`offloaded_layers` counts those)."""
        found = {replace(lp.strategy, offload_activations=False) for lp in self.layers if lp.kind in TRANSFORMER_KINDS}
        return next(iter(found)) if len(found) == 1 else None

    @property
    def offloaded_layers(self) -> int:
        """Transformer layers whose activations wait in host memory between forward and backward."""
        return sum(lp.strategy.offload_activations for lp in self.layers)

    @property
    def data_parallel_size(self) -> int:
        """Replicas of each stage, for plans whose layers share one (every plan an adapter runs): the
        transformer layers' data-parallel degree, else the first layer's."""
        return (self.uniform_strategy or self.layers[0].strategy).dp

    @property
    def context_parallel_size(self) -> int:
        """Ranks each sequence is split over (one degree for every layer)."""
        return self.layers[0].strategy.cp

    @property
    def micro_batch_per_replica(self) -> int:
        """Samples each data-parallel replica computes per micro-batch (see `data_parallel_size`)."""
        return self.micro_batch_all_replicas // self.data_parallel_size

    def stage_layer_counts(self, kinds: tuple[str, ...] = TRANSFORMER_KINDS) -> list[int]:
        """Layers of `kinds` per stage (per model chunk, in placement order, when interleaved)."""
        counts = [0] * self.num_stages
        for lp in self.layers:
            if lp.kind in kinds:
                counts[lp.stage] += 1
        return counts

    # --- JSON -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            model=self.model.to_dict(),
            cluster=self.cluster.to_dict(),
            training=self.training.to_dict(),
            layers=[{**asdict(lp), "strategy": lp.strategy.to_dict()} for lp in self.layers],
            stages=[asdict(sp) for sp in self.stages],
            pins=self.pins.to_dict(),
        )
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise SpecError(
                f'{source} is not a uniap plan (no "format": "{PLAN_FORMAT}")',
                "create one with `uniap plan ... -o plan.json`",
            )
        if data.get("version") not in READABLE_VERSIONS:
            raise SpecError(
                f"{source} has plan version {data.get('version')!r}; this uniap reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                "re-plan with this uniap version",
            )
        body = _upgrade({k: v for k, v in data.items() if k not in ("format", "version")}, data["version"])
        try:
            body["model"] = ModelSpec.from_dict(body["model"])
            body["cluster"] = ClusterSpec.from_dict(body["cluster"])
            body["training"] = TrainingSpec.from_dict(body["training"])
            body["pins"] = Pins(**body.get("pins", {}))
            body["layers"] = [
                LayerPlan(name=lp["name"], kind=lp["kind"], stage=lp["stage"], strategy=Strategy(**lp["strategy"]))
                for lp in body["layers"]
            ]
            body["stages"] = [StagePlan(**sp) for sp in body["stages"]]
            made = cls(**body)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"corrupt plan {source}: {exc}", "re-plan; do not edit the file by hand") from None
        for part in (made, *made.stages):
            _check_field_types(part, source)
        if made.pipeline_degree * made.devices_per_stage != made.cluster.num_gpus:
            raise SpecError(
                f"corrupt plan {source}: {made.pipeline_degree} pipeline stage(s) of {made.devices_per_stage} GPU(s) "
                f"are not its cluster's {made.cluster.num_gpus} GPUs",
                "re-plan; do not edit the file by hand",
            )
        if not (made.time_per_iteration > 0 and 0 <= made.mfu <= 1):
            raise SpecError(
                f"corrupt plan {source}: a time per iteration of {made.time_per_iteration!r} s and an MFU of "
                f"{made.mfu!r} are not a prediction (positive seconds, a fraction of the peak)",
                "re-plan; do not edit the file by hand",
            )
        return made

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(read_text(path, "plan"))
        except json.JSONDecodeError as exc:
            raise SpecError(f"corrupt plan {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise SpecError(f"corrupt plan {path}: its values nest too deeply") from None
        return cls.from_dict(data, source=str(path))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a saved plan's fields must hold, by their declared types (a hand-edited "notes": 5 or
# "time_per_iteration": "fast" is refused when the plan is read, not wherever it is first used).
FIELD_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _finite,
    "float | None": lambda v: v is None or _finite(v),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[float]": lambda v: isinstance(v, list) and all(_finite(x) for x in v),
    "dict[str, str]": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}


def _check_field_types(part: Any, source: str) -> None:
    for f in fields(part):
        check = FIELD_CHECKS.get(str(f.type))
        value = getattr(part, f.name)
        if check is not None and not check(value):
            raise SpecError(
                f"corrupt plan {source}: field '{f.name}' must be {f.type} (got {value!r})",
                "re-plan; do not edit the file by hand",
            )


def _upgrade(body: dict[str, Any], version: int) -> dict[str, Any]:
    """A version 1 or 2 plan's fields under version 3's names."""
    if version < 3:
        if "micro_batch" in body:
            body["micro_batch_all_replicas"] = body.pop("micro_batch")
        pins = dict(body.get("pins") or {})
        if "micro_batch_size" in pins:
            pins["micro_batch_per_replica"] = pins.pop("micro_batch_size")
        body["pins"] = pins
    return body


def model_flops_per_iteration(sub: Subproblem) -> float:
    """Forward + backward FLOPs of one iteration without recompute (3x forward), for MFU."""
    return 3.0 * sum(layer.flops_fwd for layer in sub.graph.layers) * sub.training.global_batch_size


def make_plan(
    sub: Subproblem,
    stage_of: list[int],
    strategy_of: list[Strategy],
    pred: Prediction,
    model: ModelSpec,
    solver: dict[str, Any],
    pins: Pins = NO_PINS,
) -> Plan:
    """Assemble the Plan for one priced assignment."""
    g = sub.graph
    layers = [LayerPlan(layer.name, layer.kind, stage_of[u], strategy_of[u]) for u, layer in enumerate(g.layers)]
    stages = []
    for i in range(sub.stages):
        members = [lp.name for lp in layers if lp.stage == i]
        mem = pred.stage_breakdown[i]
        stages.append(
            StagePlan(
                index=i,
                first_layer=members[0],
                last_layer=members[-1],
                num_layers=len(members),
                time_per_microbatch=pred.stage_time[i],
                time_per_iteration_extra=pred.stage_iteration_time[i],
                memory_bytes=pred.stage_memory[i],
                states_bytes=mem.states,
                activation_bytes=mem.activations,
                transient_bytes=mem.transients,
                step_bytes=mem.step_states,
                host_bytes=mem.host or None,
            )
        )
    tpi = pred.time_per_iteration
    samples = sub.training.global_batch_size / tpi
    c = sub.cluster
    mfu = model_flops_per_iteration(sub) / (tpi * c.num_gpus * c.peak_tflops * 1e12)
    costs = [sub.cost_of(u, s) for u, s in enumerate(strategy_of)]
    cm = sub.cost_model
    basis = {
        "compute": _basis({cost.compute_basis for cost in costs})
        + (f" x{cm.compute_scale:.3g} {CALIBRATED}" if cm.compute_scale != 1 else ""),
        "communication": _basis(cm.comm_bases),
        "overlap": cm.overlap_basis,
        "activations": _basis({cost.activation_basis for cost in costs if cost.activation_bytes}),
        "memory": f"{sub.capability.accounting.name} states, reserved = allocated x{cm.reserved_per_allocated:.3g} "
        f"{cm.reserved_basis}" + (f", {cm.memory_margin:.0%} of memory kept free" if cm.memory_margin else ""),
    }
    return Plan(
        target=sub.capability.name,
        model=model,
        cluster=c,
        training=sub.training,
        pipeline_degree=sub.deg,
        micro_batches=sub.c,
        micro_batch_all_replicas=sub.micro_batch_all_replicas,
        devices_per_stage=sub.stage_devices,
        layers=layers,
        stages=stages,
        boundary_time=pred.boundary_time,
        time_per_iteration=tpi,
        samples_per_second=samples,
        tokens_per_second=samples * g.tokens_per_sample,
        mfu=mfu,
        memory_capacity_bytes=pred.memory_capacity,
        basis=basis,
        solver=solver,
        pins=pins,
        reserved_per_allocated=pred.reserved_per_allocated,
        virtual_stages=sub.v,
    )


def _basis(bases: set[str]) -> str:
    if bases == {MEASURED}:
        return MEASURED
    return "mixed" if MEASURED in bases else ESTIMATED
