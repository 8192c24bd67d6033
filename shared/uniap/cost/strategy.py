"""Intra-layer strategies and the capability object that says which ones a framework can run.

A strategy splits one stage's n devices into TP x CP x DP (tp * cp * dp = n): tensor parallelism of degree
tp (with sequence parallelism when tp > 1, so activations between layers are split over all n devices),
context parallelism of degree cp (each rank holds 1/cp of every sequence; ring attention passes K and V
around the cp ranks) and data parallelism of degree dp. Gradients are reduced, and model states sharded per
ZeRO stage (3 = FSDP), over the dp * cp ranks that hold the same weights, as Megatron-LM does (its
data-parallel group "with context parallel"). Each layer also chooses activation recompute, or to keep its
activations in host memory where the framework offloads them. TP stays inside a node; CP is one degree for the
whole model (the data loader splits each sequence once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any

from ..errors import SpecError, UnknownPresetError
from ..model.graph import TRANSFORMER_KINDS
from ..model.spec import OVERLAPS, TP_COMM_OVERLAP, TrainingSpec
from .accounting import GENERIC_ACCOUNTING, Accounting

RECOMPUTE_MODES = ("none", "selective", "full")
# The most model chunks per pipeline rank the search tries where a target interleaves (Megatron-Bridge runs
# Llama-3.1-405B with 8; each chunk adds point-to-point transfers and in-flight activations). A pin may ask for
# more: Megatron-LM sets no maximum beyond a layer per chunk.
MAX_VIRTUAL_STAGES = 8
# Above this many model chunks per rank the search splits the transformer layers evenly over the chunks (what
# Megatron-LM's --num-virtual-stages-per-pipeline-rank runs without a layout): each chunk then holds a few layers,
# an uneven split gains little, and the placement MIQP over deg x v stages would take minutes, not seconds.
FREE_SPLIT_VIRTUAL_STAGES = 2
ZERO_NAMES = {0: "DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "FSDP"}
RECOMPUTE_SUFFIX = {"none": "", "selective": " +sel-rc", "full": " +rc"}  # how labels mark recomputation
# Model states offloaded to host memory (DeepSpeed's ZeRO-Offload): none; the optimizer (fp32 master weights,
# moments and gradients, stepped by the CPU); the parameters too (ZeRO-3 only).
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS = "none", "optimizer", "params"
OFFLOAD_MODES = (OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS)
OFFLOAD_SUFFIX = {OFFLOAD_NONE: "", OFFLOAD_OPTIMIZER: " +offload", OFFLOAD_PARAMS: " +offload(params)"}
ACTIVATION_OFFLOAD_SUFFIX = " +act-offload"  # how labels mark a layer whose activations wait in host memory


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, order=True)
class Strategy:
    """TP x CP x DP with a ZeRO stage and a recompute mode, and the ZeRO variants a framework may offer:

    offload: model states kept in host memory (OFFLOAD_MODES; any ZeRO stage >= 1, on one GPU too);
    offload_activations: the layer's activations wait for its backward in host memory, copied out after its
    forward and back before its backward while the neighbouring layers compute (Megatron-LM's
    --cpu-offloading-num-layers, Transformer Engine's cpu_offload);
    zeropp: ZeRO++ (Wang et al. 2023): weights all-gathered in int8, a secondary bf16 copy of them sharded
      inside each node for backward's all-gather, gradients reduced in int4 through node-local all-to-alls."""

    tp: int
    dp: int
    zero: int = 0
    recompute: str = "none"
    cp: int = 1
    offload: str = OFFLOAD_NONE
    zeropp: bool = False
    offload_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "zero", "cp"):
            if not _is_int(getattr(self, name)):
                raise SpecError(f"invalid strategy: {name} must be an integer (got {getattr(self, name)!r})")
        for name in ("recompute", "offload"):
            if not isinstance(getattr(self, name), str):
                raise SpecError(f"invalid strategy: {name} must be a name (got {getattr(self, name)!r})")
        for name in ("zeropp", "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"invalid strategy: {name} must be true or false (got {getattr(self, name)!r})")
        if self.tp < 1 or self.dp < 1 or self.cp < 1:
            raise SpecError(f"invalid strategy: tp ({self.tp}), cp ({self.cp}) and dp ({self.dp}) must be >= 1")
        if self.zero not in ZERO_NAMES:
            raise SpecError(f"invalid strategy: zero stage {self.zero} (0, 1, 2 or 3)")
        if self.recompute not in RECOMPUTE_MODES:
            raise SpecError(f"invalid strategy: recompute '{self.recompute}' ({', '.join(RECOMPUTE_MODES)})")
        if self.offload not in OFFLOAD_MODES:
            raise SpecError(f"invalid strategy: offload '{self.offload}' ({', '.join(OFFLOAD_MODES)})")
        if self.shards == 1 and self.zero != 0 and self.offload == OFFLOAD_NONE:
            raise SpecError("invalid strategy: ZeRO sharding needs data parallelism (dp * cp > 1) or offloading")
        if self.offload != OFFLOAD_NONE and self.zero == 0:
            raise SpecError("invalid strategy: offloading needs a ZeRO stage (1, 2 or 3)")
        if self.offload == OFFLOAD_PARAMS and self.zero != 3:
            raise SpecError("invalid strategy: offloading parameters needs ZeRO stage 3")
        if self.zeropp and (self.zero != 3 or self.shards == 1):
            raise SpecError("invalid strategy: ZeRO++ is ZeRO-3 with data parallelism")
        if self.zeropp and self.offload != OFFLOAD_NONE:
            raise SpecError("invalid strategy: offloading and ZeRO++ are alternatives (one at a time)")
        if self.offload_activations and self.recompute != "none":
            raise SpecError("invalid strategy: activations are either offloaded or recomputed, not both")

    @property
    def devices(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def shards(self) -> int:
        """Ranks holding the same weights: gradients are reduced and ZeRO shards states over them (dp * cp)."""
        return self.dp * self.cp

    @property
    def zero_variant(self) -> tuple[int, str, bool]:
        """What one DeepSpeed engine runs for every layer: the ZeRO stage and its variant."""
        return (self.zero, self.offload, self.zeropp)

    @property
    def label(self) -> str:
        """e.g. 'TP4 DP2 ZeRO-1 +rc', 'TP8 CP4 DP2 ZeRO-1', 'DP8 FSDP', 'DP16 ZeRO++', 'ZeRO-2 +offload', '1 GPU'."""
        parts = [f"TP{self.tp}"] if self.tp > 1 else []
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        if self.dp > 1:
            parts.append(f"DP{self.dp}")
        if self.zero:
            parts.append("ZeRO++" if self.zeropp else ZERO_NAMES[self.zero])
        text = " ".join(parts) or "1 GPU"
        suffix = ACTIVATION_OFFLOAD_SUFFIX if self.offload_activations else RECOMPUTE_SUFFIX[self.recompute]
        return text + OFFLOAD_SUFFIX[self.offload] + suffix

    @property
    def zero_label(self) -> str:
        """The ZeRO stage as DeepSpeed's users name it, with its variant: 'ZeRO-1', 'ZeRO-2 +offload', 'ZeRO++'."""
        return ("ZeRO++" if self.zeropp else f"ZeRO-{self.zero}") + OFFLOAD_SUFFIX[self.offload]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Capability:
    """What a target framework can execute; the MIQP turns each field into constraints.

    uniform_*: one value for every transformer layer of every stage (a framework-wide flag) instead
    of a per-layer choice. max_zero_with_pipeline: the highest ZeRO stage allowed when the pipeline
    has more than one stage. tp_degrees None: any degree that divides a node's GPUs. cp_degrees: the
    context-parallel degrees it runs (None: any the sequence allows; one for every layer in any case).
    virtual_stages: the model chunks per pipeline rank the search tries (1: plain 1F1B), with the micro-batch
    count a multiple of the pipeline degree when above 1; a target that interleaves at all runs any pinned
    count the layers allow.
    accounting: how the framework keeps model states in memory and updates them (bytes per parameter,
    optimizer traffic). precision_aware_optimizer: it can keep gradients, master parameters and moments in
    lower precision (TrainingSpec.precision_aware_optimizer). vocab_multiple: it pads the vocabulary to a
    multiple of this times TP before building the embedding and output layer (1: the model's own vocabulary),
    which decides whether the output projection's GEMMs are aligned (uniap.cost.model.CostModel.vocab_aligned).
    offload_modes / zeropp: the ZeRO variants it runs (Strategy), offered where the cluster describes its hosts
    (offloading) or a stage spans nodes (ZeRO++). overlaps: the communication overlaps it runs beyond the
    gradient reduction's (uniap.model.spec.OVERLAPS); a job runs them unless it says otherwise (`job_training`).
    fp8: it can run a job's FP8 or FP4 recipe (TrainingSpec.fp8_recipe, fp4_recipe).
    activation_offload: it can keep some transformer layers' activations in host memory between forward and
    backward (Strategy.offload_activations), with one pipeline stage, no recompute and at least one layer's
    activations left on the GPU, where the job runs fused kernels and the cluster describes its hosts.
    """

    name: str
    description: str
    tp_degrees: tuple[int, ...] | None = None
    cp_degrees: tuple[int, ...] | None = (1,)
    virtual_stages: tuple[int, ...] = (1,)
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    recompute_modes: tuple[str, ...] = ("none", "full")
    uniform_tp: bool = False
    uniform_zero: bool = False
    uniform_recompute: bool = False
    max_zero_with_pipeline: int = 3
    max_pipeline_degree: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    accounting: Accounting = GENERIC_ACCOUNTING
    precision_aware_optimizer: bool = False
    vocab_multiple: int = 1
    offload_modes: tuple[str, ...] = (OFFLOAD_NONE,)
    zeropp: bool = False
    overlaps: tuple[str, ...] = ()
    fp8: bool = True
    activation_offload: bool = False

    def __post_init__(self) -> None:
        if not set(self.zero_stages) <= set(ZERO_NAMES) or 0 not in self.zero_stages:
            raise SpecError(f"invalid capability '{self.name}': zero_stages must include 0 and be within 0..3")
        if not set(self.recompute_modes) <= set(RECOMPUTE_MODES) or "none" not in self.recompute_modes:
            raise SpecError(f"invalid capability '{self.name}': recompute_modes must include 'none'")
        if not set(self.offload_modes) <= set(OFFLOAD_MODES) or OFFLOAD_NONE not in self.offload_modes:
            raise SpecError(f"invalid capability '{self.name}': offload_modes must include '{OFFLOAD_NONE}'")

    def job_training(self, training: TrainingSpec) -> TrainingSpec:
        """`training` with the overlaps the job runs: the ones it lists (SpecError for one this target cannot
        run), else every one the target runs, TP communication overlap only with fused kernels (Transformer
        Engine's userbuffers). SpecError for an FP8 recipe the target cannot run."""
        if training.quantized and not self.fp8:
            why = self.reasons.get("fp8", "")
            raise SpecError(
                f"target '{self.name}' cannot run the {training.quantized.upper()} recipe "
                f"'{training.quantized_recipe}'" + (f": {why}" if why else ""),
                "plan in bf16 for this target, or for --target megatron",
            )
        if training.overlaps is not None:
            missing = [o for o in training.overlaps if o not in self.overlaps]
            if missing:
                raise SpecError(
                    f"target '{self.name}' cannot overlap {', '.join(missing)}"
                    + (f" (it overlaps {', '.join(self.overlaps)})" if self.overlaps else ""),
                    "drop those overlaps, or choose another --target",
                )
            return training
        runs = tuple(o for o in self.overlaps if o != TP_COMM_OVERLAP or training.fused_kernels)
        return replace(training, overlaps=runs)

    def allows(self, s: Strategy, pipeline_degree: int) -> bool:
        if self.tp_degrees is not None and s.tp not in self.tp_degrees:
            return False
        if self.cp_degrees is not None and s.cp not in self.cp_degrees:
            return False
        if s.zero not in self.zero_stages:
            return False
        if pipeline_degree > 1 and s.zero > self.max_zero_with_pipeline:
            return False
        if s.offload not in self.offload_modes or (s.zeropp and not self.zeropp):
            return False
        if s.offload_activations and (not self.activation_offload or pipeline_degree > 1):
            return False
        return s.recompute in self.recompute_modes

    def violations(self, layers: list[tuple[str, Strategy]], pipeline_degree: int) -> list[str]:
        """Why an assignment of (layer kind, strategy) pairs cannot run on this target; empty if it can."""
        out = []
        for _, s in layers:
            if not self.allows(s, pipeline_degree):
                out.append(f"target '{self.name}' cannot run {s.label} with {pipeline_degree} pipeline stage(s)")
                break
        if len({s.cp for _, s in layers}) > 1:
            out.append("every layer runs one context-parallel degree (the sequence is split once)")
        if self.uniform_tp and len({s.tp for _, s in layers}) > 1:
            out.append(f"target '{self.name}' runs one TP degree for all layers")
        if self.uniform_zero and len({s.zero_variant for _, s in layers}) > 1:
            out.append(f"target '{self.name}' runs one ZeRO stage (and variant) for all layers")
        if self.uniform_recompute and len({s.recompute for kind, s in layers if kind in TRANSFORMER_KINDS}) > 1:
            out.append(f"target '{self.name}' runs one recompute mode for all transformer layers")
        offloaded = [kind for kind, s in layers if s.offload_activations]
        if offloaded:
            transformer = [s for kind, s in layers if kind in TRANSFORMER_KINDS]
            if len(offloaded) >= len(transformer) or any(kind not in TRANSFORMER_KINDS for kind in offloaded):
                out.append(
                    f"target '{self.name}' offloads the activations of transformer layers only, and of fewer of "
                    "them than the model has"
                )
            if any(s.recompute != "none" for s in transformer):
                out.append(f"target '{self.name}' offloads activations only where no layer recomputes")
        return out

    def check_pins(self, pins: "Pins") -> None:
        """Refuse pinned choices the target cannot run, saying which limit and why (`reasons`)."""

        def refuse(what: str, limit: str, hint: str) -> None:
            why = self.reasons.get(limit, "")
            raise SpecError(f"target '{self.name}' cannot run the pinned {what}" + (f": {why}" if why else ""), hint)

        if pins.tp is not None and self.tp_degrees is not None and pins.tp not in self.tp_degrees:
            refuse(
                f"TP degree {pins.tp}",
                "tp_degrees",
                f"pin a TP degree in {', '.join(map(str, self.tp_degrees))} or choose another --target",
            )
        if pins.cp is not None and self.cp_degrees is not None and pins.cp not in self.cp_degrees:
            refuse(
                f"context-parallel degree {pins.cp}",
                "cp_degrees",
                f"pin a context-parallel degree in {', '.join(map(str, self.cp_degrees))} or choose another --target",
            )
        if pins.virtual_stages is not None and pins.virtual_stages > 1 and max(self.virtual_stages) == 1:
            refuse(
                f"{pins.virtual_stages} model chunks per pipeline rank (interleaved pipeline)",
                "virtual_stages",
                "pin 1 chunk per rank or choose another --target",
            )
        if pins.zero is not None and pins.zero not in self.zero_stages:
            refuse(
                f"ZeRO stage {pins.zero}", "zero_stages", f"pin a ZeRO stage in {', '.join(map(str, self.zero_stages))}"
            )
        if (
            pins.zero is not None
            and pins.pipeline_degree is not None
            and pins.pipeline_degree > 1
            and pins.zero > self.max_zero_with_pipeline
        ):
            refuse(
                f"ZeRO stage {pins.zero} with {pins.pipeline_degree} pipeline stages",
                "max_zero_with_pipeline",
                f"pin ZeRO <= {self.max_zero_with_pipeline} with a pipeline, or one pipeline stage with "
                f"ZeRO {pins.zero}",
            )
        if pins.offload is not None and pins.offload not in self.offload_modes:
            refuse(f"offload '{pins.offload}'", "offload_modes", f"pin one of {', '.join(self.offload_modes)}")
        if pins.recompute is not None and pins.recompute not in self.recompute_modes:
            refuse(
                f"recompute mode '{pins.recompute}'", "recompute_modes", f"pin one of {', '.join(self.recompute_modes)}"
            )
        if pins.offloaded_layers:
            if not self.activation_offload:
                refuse("offload of activations", "activation_offload", "drop the offload, or choose another --target")
            if pins.pipeline_degree is not None and pins.pipeline_degree > 1:
                refuse(
                    f"offload of activations with {pins.pipeline_degree} pipeline stages",
                    "activation_offload",
                    "pin one pipeline stage, or drop the offload",
                )
            if pins.recompute not in (None, "none"):
                refuse(
                    f"offload of activations with {pins.recompute} recompute",
                    "activation_offload",
                    "drop the recompute or the offload",
                )
        if (
            pins.pipeline_degree is not None
            and self.max_pipeline_degree is not None
            and pins.pipeline_degree > self.max_pipeline_degree
        ):
            refuse(
                f"pipeline degree {pins.pipeline_degree}",
                "max_pipeline_degree",
                f"pin at most {self.max_pipeline_degree} stages",
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accounting": self.accounting.to_dict()}


@dataclass(frozen=True)
class Pins:
    """Choices the user fixed (e.g. `--tensor-model-parallel-size 4`): constraints, never overridden.

    `micro_batch_per_replica` is per data-parallel replica (Megatron's --micro-batch-size). `even_split`: the
    framework flag the user set cannot express an uneven split (Megatron's virtual-pipeline flags)."""

    tp: int | None = None
    pipeline_degree: int | None = None
    zero: int | None = None
    recompute: str | None = None
    micro_batch_per_replica: int | None = None
    micro_batches: int | None = None
    cp: int | None = None
    virtual_stages: int | None = None
    even_split: bool = False  # every stage holds the same number of transformer layers
    offload: str | None = None
    offloaded_layers: int | None = None  # transformer layers whose activations wait in host memory (0: none)

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pipeline_degree", "micro_batch_per_replica", "micro_batches", "virtual_stages"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise SpecError(f"invalid pin '{name}': must be a positive integer (got {v!r})")
        if not isinstance(self.even_split, bool):
            raise SpecError(f"invalid pin 'even_split': must be true or false (got {self.even_split!r})")
        if self.offloaded_layers is not None and (not _is_int(self.offloaded_layers) or self.offloaded_layers < 0):
            raise SpecError(
                f"invalid pin 'offloaded_layers': must be a non-negative integer (got {self.offloaded_layers!r})"
            )
        for name in ("recompute", "offload"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SpecError(f"invalid pin '{name}': must be a name (got {getattr(self, name)!r})")
        if self.zero is not None and (not _is_int(self.zero) or self.zero not in ZERO_NAMES):
            raise SpecError(f"invalid pin 'zero': {self.zero!r} (0, 1, 2 or 3)")
        if self.recompute is not None and self.recompute not in RECOMPUTE_MODES:
            raise SpecError(f"invalid pin 'recompute': {self.recompute!r} ({', '.join(RECOMPUTE_MODES)})")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise SpecError(f"invalid pin 'offload': {self.offload!r} ({', '.join(OFFLOAD_MODES)})")

    def allows(self, s: Strategy, micro_batch_all_replicas: int, transformer: bool) -> bool:
        if self.tp is not None and s.tp != self.tp:
            return False
        if self.cp is not None and s.cp != self.cp:
            return False
        if self.zero is not None and (s.shards > 1 or s.zero) and s.zero != self.zero:
            return False
        if self.offload is not None and s.offload != self.offload:
            return False
        if self.recompute is not None and transformer and s.recompute != self.recompute:
            return False
        if self.offloaded_layers == 0 and s.offload_activations:
            return False
        return self.micro_batch_per_replica is None or micro_batch_all_replicas == self.micro_batch_per_replica * s.dp

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


NO_PINS = Pins()

GENERIC = Capability(
    name="generic",
    description="the paper's full freedom: per layer TP degree, ZeRO stage and recompute; "
    "layers of one run on one stage share a TP degree",
    vocab_multiple=128,  # the vocabulary padded as Megatron-LM pads it: the fastest the model can be built
    overlaps=OVERLAPS,  # every overlap a framework runs: generic's space contains each target's
)


def capability_for(target: str) -> Capability:
    """The capability of `target`: 'generic', or one an installed adapter declares through the
    `uniap.targets` entry-point group (the core never imports an adapter by name)."""
    if target == GENERIC.name:
        return GENERIC
    found = {ep.name: ep for ep in entry_points(group="uniap.targets")}
    if target not in found:
        raise UnknownPresetError.of("target", target, ["generic", *sorted(found)], "pass one of the targets")
    cap = found[target].load()
    if not isinstance(cap, Capability):
        raise SpecError(f"target '{target}' does not declare a Capability object")
    return cap


def known_targets() -> list[str]:
    return ["generic", *sorted(ep.name for ep in entry_points(group="uniap.targets"))]


def cp_fits_sequence(cp: int, tp: int, divisibility: dict[str, int]) -> bool:
    """Megatron-LM's rules (core_v0.16.1 megatron/training/arguments.py validate_args, and the sequence-parallel
    scatter): with CP > 1 the sequence splits into 2 * CP chunks (two per rank, balancing causal attention),
    and each CP rank's part of the sequence splits over the TP ranks."""
    seq = divisibility.get("sequence_length")
    if seq is None:
        return cp == 1
    if cp > 1 and seq % (2 * cp):
        return False
    return seq % cp == 0 and (seq // cp) % tp == 0


def tp_fits_layer(tp: int, divisibility: dict[str, int], kind: str) -> bool:
    """Megatron-core's partitioning rules: sequence parallelism splits every layer's sequence over the
    TP ranks; a transformer layer also needs heads and FFN divisible by TP and query groups divisible by
    TP or TP by groups. Embeddings and heads pad the vocabulary, so TP fits them otherwise."""
    if divisibility.get("sequence_length", tp) % tp:
        return False
    if kind not in TRANSFORMER_KINDS:
        return True
    heads, groups, ffn = (
        divisibility["num_attention_heads"],
        divisibility["num_query_groups"],
        divisibility["ffn_hidden_size"],
    )
    return heads % tp == 0 and ffn % tp == 0 and (groups % tp == 0 or tp % groups == 0)


def zero_variants(zero: int, shards: int, gpus_per_node: int, capability: Capability, host: bool) -> list[dict]:
    """The variants of ZeRO stage `zero` over `shards` ranks the capability runs (Strategy's fields beyond the
    stage): offloading where the cluster describes its hosts (`host`); ZeRO++ when the ranks span nodes (its
    secondary partition is a node's, and it reduces gradients inside nodes first)."""
    out: list[dict] = [{}] if shards > 1 or zero == 0 else []
    if zero == 0:
        return out
    if host:
        out += [
            {"offload": m}
            for m in capability.offload_modes
            if m == OFFLOAD_OPTIMIZER or (m == OFFLOAD_PARAMS and zero == 3)
        ]
    if zero == 3 and shards > gpus_per_node and capability.zeropp:
        out.append({"zeropp": True})
    return out


def stage_strategies(
    devices: int,
    gpus_per_node: int,
    micro_batch_all_replicas: int,
    pipeline_degree: int,
    capability: Capability,
    kind: str,
    divisibility: dict[str, int],
    flash_attention: bool,
    pins: Pins = NO_PINS,
    host: bool = False,
    offload_activations: bool = False,
) -> list[Strategy]:
    """All strategies for a layer of `kind` on a stage of `devices` devices that the capability and the
    pins allow, with TP inside a node, the sequence split as CP and TP need it, and the micro-batch
    (samples per pipeline micro-batch) divisible by dp; `host`: the cluster describes its hosts (offloading);
    `offload_activations`: the job could keep activations in host memory (the capability checks the rest)."""
    transformer = kind in TRANSFORMER_KINDS
    activation_variants = (False, True) if offload_activations and host and transformer else (False,)
    out = []
    for tp in range(1, devices + 1):
        if devices % tp or tp > gpus_per_node or gpus_per_node % tp or not tp_fits_layer(tp, divisibility, kind):
            continue
        for cp in range(1, devices // tp + 1):
            if (devices // tp) % cp or not cp_fits_sequence(cp, tp, divisibility):
                continue
            dp = devices // (tp * cp)
            if micro_batch_all_replicas % dp:
                continue
            for zero in (0, 1, 2, 3):
                for variant in zero_variants(zero, dp * cp, gpus_per_node, capability, host):
                    for rc in RECOMPUTE_MODES:
                        if rc == "selective" and flash_attention and pins.recompute != "selective":
                            # With FlashAttention there is no score matrix for selective recompute to drop: never
                            # better than none, offered only when the user pinned it (it recomputes the attention).
                            continue
                        if rc != "none" and not transformer:
                            continue
                        for offloaded in activation_variants if rc == "none" else (False,):
                            s = Strategy(tp, dp, zero, rc, cp, offload_activations=offloaded, **variant)
                            if capability.allows(s, pipeline_degree) and pins.allows(
                                s, micro_batch_all_replicas, transformer
                            ):
                                out.append(s)
    return out
