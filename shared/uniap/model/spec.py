"""Model and training hyperparameters: what the planner needs to know about the network and the job.

`ModelSpec` describes the architecture (named as in megatron-core's `TransformerConfig`);
`TrainingSpec` the job (global batch, sequence length, precision). Both validate at construction and
raise `SpecError` naming the field and the rule it breaks.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal

from ..errors import SpecError

Architecture = Literal["decoder", "encoder", "encoder_decoder", "vit"]
ARCHITECTURES = ("decoder", "encoder", "encoder_decoder", "vit")
PRECISIONS = ("bf16", "fp16", "fp32")
# FP8 training recipes (Transformer Engine 2.x as megatron-core core_v0.16.1 drives it, --fp8-recipe): per-tensor
# scales from an amax history (delayed) or from the tensor itself (tensorwise, "current scaling"), 1x128/128x128
# block scales (blockwise, Hopper), and 1x32 block scales in E8M0 (mxfp8, Blackwell).
MXFP8 = "mxfp8"
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", MXFP8)
# --fp8-format: E4M3 everywhere, or E4M3 forward and E5M2 for gradients (hybrid).
FP8_FORMATS = ("hybrid", "e4m3")
# FP4 recipes (--fp4-recipe; --fp4-format e2m1): NVFP4, E2M1 values with an E4M3 scale per 16 (Blackwell).
FP4_RECIPES = ("nvfp4",)
FP8, FP4 = "fp8", "fp4"
# Communication a framework can hide behind computation beyond what every data-parallel job overlaps (the
# gradient reduction with the backward): tensor-parallel collectives behind the linear GEMMs (Megatron-LM's
# --tp-comm-overlap, Transformer Engine's userbuffers) and the distributed optimizer's all-gather of updated
# weights behind the next forward (--overlap-param-gather).
TP_COMM_OVERLAP, PARAM_GATHER_OVERLAP = "tp_comm", "param_gather"
OVERLAPS = (TP_COMM_OVERLAP, PARAM_GATHER_OVERLAP)
# Adam keeps two fp32 moments per parameter; SGD with momentum and Muon one (cost/accounting.py).
OPTIMIZERS = ("adam", "sgd", "muon")
# The dtypes a precision-aware optimizer may keep its tensors in (Megatron-LM core_v0.16.1 arguments.py:
# --main-grads-dtype, --main-params-dtype, --exp-avg-dtype, --exp-avg-sq-dtype).
MAIN_GRADS_DTYPES = ("fp32", "bf16")
MAIN_PARAMS_DTYPES = ("fp32", "fp16")
MOMENT_DTYPES = ("fp32", "fp16", "bf16", "fp8")


def _require(cond: bool, field: str, rule: str) -> None:
    if not cond:
        raise SpecError(f"invalid spec: field '{field}': {rule}")


# The largest value each integer field may take: far beyond any model or cluster trained on today (the largest
# dense models have under 200 layers, hidden sizes under 32k, vocabularies under 300k; the largest jobs under
# 100k GPUs), so that a typo is refused at once instead of hanging the planner or overflowing the solver's
# numerics.
FIELD_LIMITS = {
    "num_layers": 16_384,
    "num_decoder_layers": 16_384,
    "hidden_size": 262_144,
    "ffn_hidden_size": 1_048_576,
    "num_attention_heads": 16_384,
    "num_query_groups": 16_384,
    "kv_channels": 16_384,
    "vocab_size": 16_777_216,
    "max_position_embeddings": 16_777_216,
    "image_size": 65_536,
    "patch_size": 65_536,
    "num_channels": 1_024,
    "num_classes": 16_777_216,
    "global_batch_size": 16_777_216,
    "seq_length": 16_777_216,
    "decoder_seq_length": 16_777_216,
    "num_nodes": 131_072,
    "gpus_per_node": 1_024,
}


def _positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive integer (got {value!r})",
        )
        limit = FIELD_LIMITS.get(name)
        _require(limit is None or value <= limit, name, f"must be at most {limit:,} (got {value:,})")


@dataclass(frozen=True)
class ModelSpec:
    """A transformer's hyperparameters.

    `num_layers` counts transformer layers (for `encoder_decoder`, the encoder's; the decoder's are
    `num_decoder_layers`). `num_query_groups` None means multi-head attention (groups = heads).
    `gated_mlp` is SwiGLU/GeGLU (three FFN matrices). For `vit`, the sequence is
    (image_size / patch_size)^2 + 1 and `vocab_size` is ignored.
    """

    name: str
    architecture: Architecture
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int = 0
    num_query_groups: int | None = None
    kv_channels: int | None = None
    num_decoder_layers: int = 0
    gated_mlp: bool = False
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    tied_embeddings: bool = True
    position_embedding: Literal["learned", "rope", "relative"] = "learned"
    max_position_embeddings: int = 2048
    add_bias: bool = True
    dropout: float = 0.1
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), "name", "must be a non-empty string")
        _require(self.architecture in ARCHITECTURES, "architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        _positive_ints(
            self, ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings")
        )
        # The image fields have defaults and are read for a ViT only, but are integers for every model (a spec
        # is whole before any use).
        _positive_ints(self, ("image_size", "patch_size", "num_channels", "num_classes"))
        if self.architecture != "vit":
            _positive_ints(self, ("vocab_size",))
        else:
            _require(
                self.image_size % self.patch_size == 0,
                "image_size",
                f"must be divisible by patch_size ({self.image_size} % {self.patch_size} != 0)",
            )
        if self.architecture == "encoder_decoder":
            _positive_ints(self, ("num_decoder_layers",))
        else:
            _require(
                self.num_decoder_layers == 0, "num_decoder_layers", "only an encoder_decoder model has decoder layers"
            )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"must be divisible by num_attention_heads ({self.hidden_size} % "
                f"{self.num_attention_heads} != 0) unless kv_channels is given",
            )
        else:
            _positive_ints(self, ("kv_channels",))
        if self.num_query_groups is not None:
            _positive_ints(self, ("num_query_groups",))
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                "num_query_groups",
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by it ({self.num_query_groups})",
            )
        _require(self.normalization in ("layernorm", "rmsnorm"), "normalization", "must be layernorm or rmsnorm")
        _require(
            self.position_embedding in ("learned", "rope", "relative"),
            "position_embedding",
            "must be learned, rope or relative",
        )
        _require(
            isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0,
            "dropout",
            "must be in [0, 1)",
        )
        for name in ("gated_mlp", "tied_embeddings", "add_bias"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def vit_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return _from_dict(cls, data, "model")


@dataclass(frozen=True)
class TrainingSpec:
    """The job: global batch (samples per iteration), sequence length, precision, attention kernel.

    `flash_attention` True means the attention kernel keeps no s x s score matrix (FlashAttention,
    Transformer Engine fused attention); False keeps the Korthikanti et al. 5*a*s^2*b bytes per layer.
    `decoder_seq_length` is the target length of an encoder-decoder model (defaults to seq_length).
    `fused_kernels` True means Transformer Engine or Apex is installed beside Megatron-LM: a fused Adam and
    weight-gradient GEMMs that accumulate straight into the fp32 gradient buffer. False is megatron-core's
    fallback (megatron/core/optimizer/__init__.py): torch's foreach AdamW, whose step holds an fp32
    temporary per parameter, and a separate pass adding each micro-batch's gradients into the buffer.
    `optimizer` sets the optimizer states per parameter (Adam's two moments, SGD's or Muon's one momentum).
    `precision_aware_optimizer` (Adam only; Megatron-LM's --use-precision-aware-optimizer, TransformerEngine's
    FusedAdam) keeps the gradients, the fp32 master parameters and Adam's moments in the `*_dtype` fields'
    dtypes; without it they are all fp32.
    `fp8_recipe` (None: no FP8) runs the transformer layers' linear GEMMs in FP8 (Transformer Engine) with
    `precision` the dtype of everything else (parameters, the attention core, embedding and output layer);
    `fp4_recipe` likewise in FP4 (NVFP4; Megatron-LM's --fp4-format, exclusive with FP8).
    `overlaps`: the OVERLAPS the job runs; None leaves them to the planner (those the target runs), which
    writes the ones it chose into the plan's training spec.
    `grad_reduce_in_bf16` (Megatron-LM's --grad-reduce-in-bf16; Megatron-Bridge's default): the gradient buffer
    and its reduction in bf16 where the framework would keep them in fp32. `fp8_param_gather`
    (--fp8-param-gather): the linear layers' parameters kept, and all-gathered, in FP8.
    """

    global_batch_size: int
    seq_length: int
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    flash_attention: bool = True
    decoder_seq_length: int | None = None
    fused_kernels: bool = True
    optimizer: str = "adam"
    precision_aware_optimizer: bool = False
    main_grads_dtype: str = "fp32"
    main_params_dtype: str = "fp32"
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    fp8_recipe: str | None = None
    fp8_format: str = "hybrid"
    fp4_recipe: str | None = None
    overlaps: tuple[str, ...] | None = None
    grad_reduce_in_bf16: bool = False
    fp8_param_gather: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.overlaps, list):  # read from JSON
            object.__setattr__(self, "overlaps", tuple(self.overlaps))
        _require(
            self.overlaps is None or (isinstance(self.overlaps, tuple) and all(o in OVERLAPS for o in self.overlaps)),
            "overlaps",
            f"must list some of {', '.join(OVERLAPS)} (or be absent: the planner chooses)",
        )
        _positive_ints(self, ("global_batch_size", "seq_length"))
        _require(
            self.fp8_recipe is None or self.fp8_recipe in FP8_RECIPES,
            "fp8_recipe",
            f"must be one of {', '.join(FP8_RECIPES)} or absent",
        )
        _require(self.fp8_format in FP8_FORMATS, "fp8_format", f"must be one of {', '.join(FP8_FORMATS)}")
        _require(
            self.fp4_recipe is None or self.fp4_recipe in FP4_RECIPES,
            "fp4_recipe",
            f"must be one of {', '.join(FP4_RECIPES)} or absent",
        )
        _require(
            self.fp4_recipe is None or (self.fp8_recipe is None and self.precision in ("bf16", "fp16")),
            "fp4_recipe",
            "excludes fp8_recipe and needs bf16 or fp16 beside it (Megatron-LM validate_args)",
        )
        _require(
            self.fp8_recipe is None or self.precision in ("bf16", "fp16"),
            "fp8_recipe",
            "needs --bf16 or --fp16 beside it (FP8 GEMMs inside a bf16/fp16 model, as Megatron-LM runs them)",
        )
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        for name, choices in (
            ("main_grads_dtype", MAIN_GRADS_DTYPES),
            ("main_params_dtype", MAIN_PARAMS_DTYPES),
            ("exp_avg_dtype", MOMENT_DTYPES),
            ("exp_avg_sq_dtype", MOMENT_DTYPES),
        ):
            _require(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}")
            _require(
                self.precision_aware_optimizer or getattr(self, name) == "fp32",
                name,
                "can only be fp32 without the precision-aware optimizer (Megatron-LM's OptimizerConfig asserts it)",
            )
        _require(
            not self.precision_aware_optimizer or self.optimizer == "adam",
            "precision_aware_optimizer",
            "is only supported with the adam optimizer",
        )
        if self.decoder_seq_length is not None:
            _positive_ints(self, ("decoder_seq_length",))
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        for name in (
            "flash_attention",
            "fused_kernels",
            "precision_aware_optimizer",
            "grad_reduce_in_bf16",
            "fp8_param_gather",
        ):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")
        _require(not self.grad_reduce_in_bf16 or self.precision == "bf16", "grad_reduce_in_bf16", "needs bf16")
        _require(not self.fp8_param_gather or self.fp8, "fp8_param_gather", "needs an fp8_recipe")

    @property
    def bytes_per_value(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def fp8(self) -> bool:
        """Whether the transformer layers' linear GEMMs run in FP8."""
        return self.fp8_recipe is not None

    @property
    def quantized(self) -> str | None:
        """What the transformer layers' linear GEMMs run in below the compute dtype: FP8, FP4 or None."""
        return FP8 if self.fp8 else FP4 if self.fp4_recipe else None

    @property
    def quantized_recipe(self) -> str | None:
        return self.fp8_recipe or self.fp4_recipe

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.overlaps is not None:
            data["overlaps"] = list(self.overlaps)  # as JSON holds it
        return data

    def check_against(self, model: ModelSpec) -> None:
        """Rules that involve both specs (Megatron asserts the same: max_position_embeddings >= seq)."""
        if model.architecture == "vit":
            return
        for name in ("seq_length", "decoder_seq_length"):
            value = getattr(self, name)
            _require(
                value is None or model.max_position_embeddings >= value,
                name,
                f"must not exceed the model's max_position_embeddings ({value} > "
                f"{model.max_position_embeddings}); use a shorter length or a model spec with "
                f"larger max_position_embeddings",
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSpec":
        return _from_dict(cls, data, "training")


def _from_dict(cls, data: dict[str, Any], what: str):
    if not isinstance(data, dict):
        raise SpecError(f"invalid {what} spec: expected a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(
            f"invalid {what} spec: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise SpecError(
            f"invalid {what} spec: missing required field(s) {', '.join(missing)}; required fields: "
            f"{', '.join(required)}",
            f"add the missing fields (the optional ones: {', '.join(sorted(known - set(required)))})",
        )
    return cls(**data)


def default_seq_length(model: ModelSpec) -> int:
    """The sequence a model trains at unless told: a ViT's patches plus its class token, else the model's
    maximum position."""
    return model.vit_seq_length if model.architecture == "vit" else model.max_position_embeddings


def training_spec(model: ModelSpec, global_batch_size: int, seq_length: int | None = None, **fields) -> TrainingSpec:
    """The job's TrainingSpec with the defaults applied (the sequence length; TrainingSpec's own for the
    rest); SpecError names a field that breaks a rule, including one that involves the model."""
    if seq_length is not None and (not isinstance(seq_length, int) or seq_length < 1):
        raise SpecError(f"invalid sequence length: must be a positive integer (got {seq_length!r})")
    if model.architecture == "vit" and seq_length not in (None, model.vit_seq_length):
        # The layer graph runs a ViT at its own sequence: another length would be priced as that one but
        # labelled as asked.
        raise SpecError(
            f"invalid spec: field 'seq_length': a ViT's sequence is its {model.vit_seq_length - 1} patches plus "
            f"the class token ({model.vit_seq_length}), not {seq_length}",
            "leave --seq-length out",
        )
    training = TrainingSpec(
        global_batch_size=global_batch_size, seq_length=seq_length or default_seq_length(model), **fields
    )
    training.check_against(model)
    return training
