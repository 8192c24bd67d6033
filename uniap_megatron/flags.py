"""Every Megatron-LM flag uniap writes or reads, declared once (Megatron-LM core_v0.16.1,
megatron/training/arguments.py and the config dataclasses it derives flags from).

Everything else derives from this table: the arguments a plan emits (`Flag.tokens`, in args.py), parsing
them back into Megatron's `args` attributes (merge.py), and reading a user's command line for the
model, the batch and the parallel settings they pinned (args.py, `read_parser`). A test checks each
entry's dest, kind and default against Megatron-LM's own parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import Enum
from typing import Any

from uniap.errors import SpecError


class Kind(Enum):
    """How argparse stores a flag (Megatron's action for it)."""

    VALUE = "value"  # takes a value of `Flag.type`
    SWITCH = "store_true"
    NEGATION = "store_false"  # a `--no-<x>` / `--disable-<x>` flag clearing `dest`
    IMPLIES = "store_const"  # sets `dest` to `Flag.const` (an alias such as --recompute-activations)


@dataclass(frozen=True)
class Flag:
    """One Megatron-LM command-line flag: its spelling, the `args` attribute it sets, how, and Megatron's
    default (what the attribute holds when the flag is absent)."""

    spelling: str
    kind: Kind = Kind.VALUE
    type: type | None = None
    default: Any = None
    dest: str = ""
    const: Any = None

    def __post_init__(self) -> None:
        if not self.dest:
            object.__setattr__(self, "dest", self.spelling.lstrip("-").replace("-", "_"))
        if self.kind is Kind.VALUE and self.type is None:
            raise TypeError(f"{self.spelling}: a value flag needs a type")
        if self.kind is Kind.SWITCH and self.default is None:
            object.__setattr__(self, "default", False)
        if self.kind is Kind.NEGATION and self.default is None:
            object.__setattr__(self, "default", True)

    @property
    def takes_value(self) -> bool:
        return self.kind is Kind.VALUE

    def tokens(self, value: Any = True) -> list[str]:
        """The command-line words that set this flag to `value` (a switch: just its spelling)."""
        return [self.spelling, str(value)] if self.takes_value else [self.spelling]

    def add_to(self, parser: argparse.ArgumentParser, with_default: bool) -> None:
        """Add as Megatron defines it; without a default the namespace holds only what was given."""
        default = self.default if with_default else argparse.SUPPRESS
        if self.kind is Kind.VALUE:
            parser.add_argument(self.spelling, dest=self.dest, type=self.type, default=default)
        elif self.kind is Kind.IMPLIES:
            parser.add_argument(self.spelling, dest=self.dest, action="store_const", const=self.const, default=default)
        else:
            parser.add_argument(self.spelling, dest=self.dest, action=self.kind.value, default=default)


# --- parallelism and batch (a plan sets these) --------------------------------------------------------
TENSOR_PARALLEL = Flag("--tensor-model-parallel-size", type=int, default=1)
CONTEXT_PARALLEL = Flag("--context-parallel-size", type=int, default=1)
PIPELINE_PARALLEL = Flag("--pipeline-model-parallel-size", type=int, default=1)
MICRO_BATCH_SIZE = Flag("--micro-batch-size", type=int)  # per data-parallel replica
GLOBAL_BATCH_SIZE = Flag("--global-batch-size", type=int)
FIRST_STAGE_LAYERS = Flag("--decoder-first-pipeline-num-layers", type=int)
LAST_STAGE_LAYERS = Flag("--decoder-last-pipeline-num-layers", type=int)
PIPELINE_LAYOUT = Flag("--pipeline-model-parallel-layout", type=str)
VIRTUAL_STAGES_PER_RANK = Flag("--num-virtual-stages-per-pipeline-rank", type=int)
SEQUENCE_PARALLEL = Flag("--sequence-parallel", Kind.SWITCH)
DISTRIBUTED_OPTIMIZER = Flag("--use-distributed-optimizer", Kind.SWITCH)
OVERLAP_GRAD_REDUCE = Flag("--overlap-grad-reduce", Kind.SWITCH)
OVERLAP_PARAM_GATHER = Flag("--overlap-param-gather", Kind.SWITCH)
MEGATRON_FSDP = Flag("--use-megatron-fsdp", Kind.SWITCH)
SHARDING_STRATEGY = Flag("--data-parallel-sharding-strategy", type=str, default="no_shard")
NO_GRAD_ACCUMULATION_FUSION = Flag(
    "--no-gradient-accumulation-fusion", Kind.NEGATION, dest="gradient_accumulation_fusion"
)
CHECKPOINT_FORMAT = Flag("--ckpt-format", type=str, default="torch_dist")
RECOMPUTE_GRANULARITY = Flag("--recompute-granularity", type=str)
RECOMPUTE_METHOD = Flag("--recompute-method", type=str)
RECOMPUTE_NUM_LAYERS = Flag("--recompute-num-layers", type=int)
# Activations of this many transformer layers offloaded to host memory (validate_args sets --cpu-offloading
# from it, megatron/training/arguments.py 1236-1237; the flag itself comes from TransformerConfig's field).
CPU_OFFLOADING_LAYERS = Flag("--cpu-offloading-num-layers", type=int, default=0)
BF16 = Flag("--bf16", Kind.SWITCH)
FP16 = Flag("--fp16", Kind.SWITCH)
# Transformer Engine (megatron-core TransformerConfig / ModelParallelConfig fields, as Megatron-LM's parser
# derives them): FP8 GEMMs, and TP collectives overlapped with GEMMs (userbuffers).
FP8_FORMAT = Flag("--fp8-format", type=str, dest="fp8")
FP8_RECIPE = Flag("--fp8-recipe", type=str, default="delayed")
TP_COMM_OVERLAP = Flag("--tp-comm-overlap", Kind.SWITCH)
FP8_PARAM_GATHER = Flag("--fp8-param-gather", Kind.SWITCH)
FP4_FORMAT = Flag("--fp4-format", type=str, dest="fp4")
FP4_RECIPE = Flag("--fp4-recipe", type=str, default="nvfp4")
GRAD_REDUCE_IN_BF16 = Flag("--grad-reduce-in-bf16", Kind.SWITCH)

# The flags a plan sets, in the order args.py emits them.
PLAN_FLAGS = (
    TENSOR_PARALLEL,
    CONTEXT_PARALLEL,
    PIPELINE_PARALLEL,
    MICRO_BATCH_SIZE,
    GLOBAL_BATCH_SIZE,
    FIRST_STAGE_LAYERS,
    LAST_STAGE_LAYERS,
    PIPELINE_LAYOUT,
    VIRTUAL_STAGES_PER_RANK,
    SEQUENCE_PARALLEL,
    DISTRIBUTED_OPTIMIZER,
    OVERLAP_GRAD_REDUCE,
    OVERLAP_PARAM_GATHER,
    MEGATRON_FSDP,
    SHARDING_STRATEGY,
    NO_GRAD_ACCUMULATION_FUSION,
    CHECKPOINT_FORMAT,
    RECOMPUTE_GRANULARITY,
    RECOMPUTE_METHOD,
    RECOMPUTE_NUM_LAYERS,
    CPU_OFFLOADING_LAYERS,
    BF16,
    FP16,
    FP8_FORMAT,
    FP8_RECIPE,
    TP_COMM_OVERLAP,
    FP8_PARAM_GATHER,
    FP4_FORMAT,
    FP4_RECIPE,
    GRAD_REDUCE_IN_BF16,
)

# --- other spellings of the same settings a user may pass (Megatron's aliases and implications) -------
RECOMPUTE_ACTIVATIONS = Flag(
    "--recompute-activations", Kind.IMPLIES, dest="recompute_granularity", const="selective"
)  # validate_args turns it into granularity 'selective'
TORCH_FSDP2 = Flag("--use-torch-fsdp2", Kind.SWITCH)
USER_ALIASES = (RECOMPUTE_ACTIVATIONS, TORCH_FSDP2)

# --- the model and the job (read from a user's command line; emitted by `model_args`) -----------------
NUM_LAYERS = Flag("--num-layers", type=int)
HIDDEN_SIZE = Flag("--hidden-size", type=int)
NUM_ATTENTION_HEADS = Flag("--num-attention-heads", type=int)
GROUP_QUERY_ATTENTION = Flag("--group-query-attention", Kind.SWITCH)
NUM_QUERY_GROUPS = Flag("--num-query-groups", type=int, default=1)
FFN_HIDDEN_SIZE = Flag("--ffn-hidden-size", type=int)
KV_CHANNELS = Flag("--kv-channels", type=int)
SEQ_LENGTH = Flag("--seq-length", type=int)
MAX_POSITION_EMBEDDINGS = Flag("--max-position-embeddings", type=int)
VOCAB_SIZE = Flag("--vocab-size", type=int)
PADDED_VOCAB_SIZE = Flag("--padded-vocab-size", type=int)
VOCAB_DIVISIBLE_BY = Flag("--make-vocab-size-divisible-by", type=int, default=128)
SWIGLU = Flag("--swiglu", Kind.SWITCH)
UNTIE_EMBEDDINGS = Flag("--untie-embeddings-and-output-weights", Kind.SWITCH)
NORMALIZATION = Flag("--normalization", type=str, default="LayerNorm")
POSITION_EMBEDDING = Flag("--position-embedding-type", type=str, default="learned_absolute")
DISABLE_BIAS_LINEAR = Flag("--disable-bias-linear", Kind.NEGATION, dest="add_bias_linear")
HIDDEN_DROPOUT = Flag("--hidden-dropout", type=float, default=0.1)
OPTIMIZER = Flag("--optimizer", type=str, default="adam")  # adam, sgd, muon, dist_muon
PRECISION_AWARE_OPTIMIZER = Flag("--use-precision-aware-optimizer", Kind.SWITCH)
MAIN_GRADS_DTYPE = Flag("--main-grads-dtype", type=str, default="fp32")
MAIN_PARAMS_DTYPE = Flag("--main-params-dtype", type=str, default="fp32")
EXP_AVG_DTYPE = Flag("--exp-avg-dtype", type=str, default="fp32")
EXP_AVG_SQ_DTYPE = Flag("--exp-avg-sq-dtype", type=str, default="fp32")
MODEL_FLAGS = (
    NUM_LAYERS,
    HIDDEN_SIZE,
    NUM_ATTENTION_HEADS,
    GROUP_QUERY_ATTENTION,
    NUM_QUERY_GROUPS,
    FFN_HIDDEN_SIZE,
    KV_CHANNELS,
    SEQ_LENGTH,
    MAX_POSITION_EMBEDDINGS,
    VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    VOCAB_DIVISIBLE_BY,
    SWIGLU,
    UNTIE_EMBEDDINGS,
    NORMALIZATION,
    POSITION_EMBEDDING,
    DISABLE_BIAS_LINEAR,
    HIDDEN_DROPOUT,
    OPTIMIZER,
    PRECISION_AWARE_OPTIMIZER,
    MAIN_GRADS_DTYPE,
    MAIN_PARAMS_DTYPE,
    EXP_AVG_DTYPE,
    EXP_AVG_SQ_DTYPE,
)

# --- parallelism uniap does not plan yet: refused by name when set, never ignored -----------------------
EXPERT_PARALLEL = Flag("--expert-model-parallel-size", type=int, default=1)
LAYERS_PER_VIRTUAL_STAGE = Flag("--num-layers-per-virtual-pipeline-stage", type=int)
NUM_EXPERTS = Flag("--num-experts", type=int)
UNPLANNED_FLAGS = (EXPERT_PARALLEL, LAYERS_PER_VIRTUAL_STAGE, NUM_EXPERTS)

ALL_FLAGS = PLAN_FLAGS + USER_ALIASES + MODEL_FLAGS + UNPLANNED_FLAGS
BY_SPELLING = {f.spelling: f for f in ALL_FLAGS}
# Megatron's values for the choices a plan makes (megatron/training/arguments.py).
LAYERNORM, RMSNORM = "LayerNorm", "RMSNorm"
LEARNED_ABSOLUTE, ROPE = "learned_absolute", "rope"
OPTIM_GRADS_PARAMS = "optim_grads_params"  # Megatron-FSDP sharding of everything (ZeRO-3)
FSDP_DTENSOR = "fsdp_dtensor"  # the checkpoint format Megatron-FSDP saves
FULL, SELECTIVE, UNIFORM = "full", "selective", "uniform"
E2M1 = "e2m1"  # --fp4-format's one value


def parser(flags: tuple[Flag, ...], with_defaults: bool) -> argparse.ArgumentParser:
    """A parser of `flags` exactly as Megatron maps them (no abbreviations, no help, errors raised)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in flags:
        flag.add_to(p, with_defaults)
    return p


def read_parser() -> argparse.ArgumentParser:
    """What uniap reads from a user's Megatron command line: the model flags with Megatron's defaults, the
    plan's flags and their aliases only where given (those are the user's pins); other flags pass."""
    p = parser(MODEL_FLAGS + UNPLANNED_FLAGS, with_defaults=True)
    for flag in PLAN_FLAGS + USER_ALIASES:
        flag.add_to(p, with_default=False)
    return p


def check_no_abbreviations(unknown: list[str]) -> None:
    """Megatron-LM's parser takes no abbreviations (allow_abbrev=False, megatron/training/arguments.py
    parse_args) and refuses what it does not know: an option that is the start of a flag uniap reads would be
    priced as absent here and refused by Megatron there. SpecError naming the full flag."""
    spellings = [flag.spelling for flag in MODEL_FLAGS + UNPLANNED_FLAGS + PLAN_FLAGS + USER_ALIASES]
    for token in unknown:
        option = token.split("=", 1)[0]
        if not option.startswith("--"):
            continue
        full = sorted(s for s in spellings if s.startswith(option) and s != option)
        if full:
            raise SpecError(
                f"{option} is not a Megatron-LM argument: its parser takes no abbreviations (did you mean "
                f"{' or '.join(full[:3])}?)",
                "spell the argument out; Megatron-LM would refuse the job as written",
            )


def flag_of(dest: str) -> str:
    """The spelling a plan uses for Megatron attribute `dest`."""
    return next((f.spelling for f in PLAN_FLAGS + USER_ALIASES if f.dest == dest), "--" + dest.replace("_", "-"))
