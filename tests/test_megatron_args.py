"""The Megatron-LM arguments uniap emits, checked against Megatron's own rules over many plans.

Plans come from the core for target megatron: `uniap plan` over a grid (four decoder models, one to four
DGX A100 nodes, several global batches / sequence lengths, pins such as --pp, --tp, --zero, --recompute,
--precision) and `uniap evaluate` with hand-given uneven splits, so all three split encodings (even,
--decoder-first/last-pipeline-num-layers, --pipeline-model-parallel-layout) occur. For every plan,
`megatron_launch(plan).args + model_args(model, training)` is checked three ways:

1. `megatron_violations` below: an independent re-statement of the rules a plan must satisfy in
   Megatron-LM core_v0.16.1 (megatron/training/arguments.py validate_args, the micro-batch calculator,
   megatron-core's TransformerConfig, get_num_layers_to_build, the layout parser), written from those
   sources, not by calling the generator's helpers; plus the translation (the arguments say what
   the plan and the model say).
2. megatron-core's own `PipelineParallelLayerLayout` parses an emitted layout, and its per-stage layer
   counts must equal `plan.stage_layer_counts()`.
3. megatron-core's `TransformerConfig` is built from the emitted values the way Megatron-LM's
   `core_transformer_config_from_args` does, so its `__post_init__` validation runs for real; its
   `get_num_layers_to_build` / layer offsets per pipeline rank must match the plan's stages.

Also: the Megatron command line -> job direction (`job_from_args`), `world_size()` from the launcher's
environment, and the split encoder on splits the evaluator cannot produce (empty first/last stage).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import typing
from dataclasses import fields

import pytest
from uniap.cli import main
from uniap.errors import SpecError
from uniap.model.presets import MODEL_PRESETS
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan

from uniap_megatron.args import job_from_args, megatron_launch, model_args, pipeline_split_args, world_size
from uniap_megatron.environment import fused_kernels_available

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

# megatron-core warns about Apex/TE being absent and about TransformerConfig defaults; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron")


# --- the plans ---------------------------------------------------------------------------------------

CLUSTERS = [(1, 4), (1, 8), (2, 8), (4, 8)]
MODEL_JOBS = {  # (global batch, sequence length) per model, within its max_position_embeddings
    "gpt3-1.3b": [(16, 1024), (64, 2048), (512, 2048)],
    "llama2-7b": [(16, 1024), (64, 2048), (512, 4096)],
    "llama3-8b": [(16, 1024), (64, 2048), (512, 8192)],
    "llama2-70b": [(16, 1024), (64, 2048), (512, 4096)],
}
# At Megatron's 18 bytes per parameter (bf16 weights, fp32 gradients, fp32 Adam), 70B needs more than 16 A100s.
MODEL_CLUSTERS = {"llama2-70b": [(4, 8), (8, 8)]}
PINS = [[], ["--pp", "2"], ["--pp", "4"], ["--tp", "2"], ["--tp", "4"], ["--zero", "1"], ["--zero", "3"],
        ["--recompute", "full"], ["--recompute", "selective", "--no-flash-attention"],
        ["--precision", "fp16"], ["--precision", "fp32"],
        ["--tp", "2", "--pp", "2", "--zero", "1", "--recompute", "full"]]


def _plan_grid() -> list[tuple[str, list[str]]]:
    """Every model x cluster x pin set; the (batch, seq) job rotates with the pin set and the cluster so
    each model meets each job under different pins (a full product would take minutes to solve)."""
    grid = []
    for model, jobs in MODEL_JOBS.items():
        for ci, (nodes, gpus) in enumerate(MODEL_CLUSTERS.get(model, CLUSTERS)):
            for pi, pin in enumerate(PINS):
                if model == "llama2-70b" and pin == PINS[-1]:
                    pin = ["--tp", "8", "--pp", "2", "--zero", "1", "--recompute", "full"]  # TP 2 does not fit
                gbs, seq = jobs[(pi + ci) % len(jobs)]
                name = f"{model}-{nodes}x{gpus}-b{gbs}-s{seq}" + ("-" + "".join(pin).replace("--", "") if pin else "")
                grid.append((name, ["plan", "--model", model, "--cluster", "dgx-a100-80g", "--nodes", str(nodes),
                                    "--gpus-per-node", str(gpus), "--global-batch-size", str(gbs),
                                    "--seq-length", str(seq), "--target", "megatron", *pin]))
    return grid


def _evaluate(model: str, nodes: int, gpus: int, gbs: int, seq: int, *config: str) -> tuple[str, list[str]]:
    name = f"eval-{model}-{nodes}x{gpus}-" + "-".join(word.lstrip("-") for word in config)
    return name, ["evaluate", "--model", model, "--cluster", "dgx-a100-80g", "--nodes", str(nodes),
                  "--gpus-per-node", str(gpus), "--global-batch-size", str(gbs), "--seq-length", str(seq),
                  "--target", "megatron", *config]


# Hand-made configurations with uneven splits (uniap evaluate --split): first/last flags with both ends
# given, only the first, only the last, an explicit even split, and splits only a layout can express.
EVAL_GRID = [
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "9,8,8,7"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "3,13,13,3"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "1,15,15,1"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "12,4,4,12"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "8,8,8,8"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "5,9,9,9"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "9,9,9,5"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "1,1,1,29"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "2,10,12,8"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--split", "8,7,9,8"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "2", "--split", "17,15"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "2", "--split", "31,1"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "2", "--split", "1,31"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "2", "--split", "16,16"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "8", "--split", "1,5,5,5,5,5,5,1"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "8", "--split", "3,4,5,4,4,4,4,4"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "8", "--split", "4,4,4,4,4,4,4,4"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--tp", "2", "--pp", "4", "--split", "9,8,8,7"),
    _evaluate("llama2-7b", 1, 8, 32, 2048, "--tp", "2", "--pp", "2", "--zero", "1", "--split", "2,30"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--zero", "1", "--split", "2,10,12,8"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--tp", "2", "--pp", "2", "--recompute", "full", "--split", "17,15"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--recompute", "selective", "--no-flash-attention",
              "--split", "3,13,13,3"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--precision", "fp16", "--split", "7,9,9,7"),
    _evaluate("llama2-7b", 1, 8, 16, 2048, "--pp", "4", "--precision", "fp32", "--split", "6,6,10,10"),
    _evaluate("gpt3-1.3b", 1, 6, 12, 2048, "--pp", "3", "--split", "10,7,7"),
    _evaluate("gpt3-1.3b", 1, 6, 12, 2048, "--pp", "3", "--split", "7,7,10"),
    _evaluate("gpt3-1.3b", 1, 6, 12, 2048, "--pp", "3", "--split", "6,10,8"),
    _evaluate("gpt3-1.3b", 1, 8, 16, 2048, "--tp", "2", "--pp", "4", "--split", "7,5,5,7"),
    _evaluate("gpt3-1.3b", 1, 4, 16, 1024, "--pp", "4", "--split", "13,4,4,3"),
    _evaluate("gpt3-1.3b", 1, 8, 16, 2048, "--pp", "8", "--split", "3,3,3,3,3,3,3,3"),
    _evaluate("gpt3-1.3b", 1, 8, 16, 2048, "--pp", "8", "--split", "2,3,3,3,3,3,3,4"),
    _evaluate("gpt3-1.3b", 1, 8, 16, 2048, "--pp", "8", "--split", "1,2,3,4,5,4,3,2"),
    _evaluate("llama2-70b", 4, 8, 16, 4096, "--tp", "4", "--pp", "8", "--split", "9,10,10,10,10,10,10,11"),
    _evaluate("llama2-70b", 4, 8, 16, 4096, "--tp", "8", "--pp", "4", "--split", "19,21,21,19"),
    _evaluate("llama2-70b", 4, 8, 16, 4096, "--tp", "8", "--pp", "4", "--split", "10,30,30,10"),
    _evaluate("llama2-70b", 4, 8, 16, 4096, "--tp", "8", "--pp", "4", "--split", "20,25,15,20"),
    _evaluate("llama3-8b", 2, 8, 16, 8192, "--tp", "4", "--pp", "4", "--split", "7,9,9,7"),
    _evaluate("llama3-8b", 2, 8, 16, 2048, "--tp", "2", "--pp", "4", "--zero", "1", "--split", "1,15,15,1"),
    _evaluate("llama3-8b", 2, 8, 64, 2048, "--tp", "8", "--zero", "3"),
    _evaluate("llama3-8b", 2, 8, 64, 2048, "--tp", "4", "--zero", "3", "--recompute", "full"),
    _evaluate("llama3-8b", 1, 8, 64, 2048, "--zero", "3", "--micro-batch-size", "2"),
]

ALL_JOBS = _plan_grid() + EVAL_GRID


def eval_job(suffix: str) -> tuple[str, list[str]]:
    """The EVAL_GRID entry whose name ends with `suffix`."""
    found = [job for job in EVAL_GRID if job[0].endswith(suffix)]
    assert len(found) == 1, (suffix, [n for n, _ in EVAL_GRID])
    return found[0]


_PLANS: dict[str, Plan | None] = {}


def _run_uniap(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv + ["--json"])
    return rc, out.getvalue(), err.getvalue()


def get_plan(name: str, argv: list[str]) -> Plan:
    """The plan of one grid entry (solved once per session). `uniap evaluate` exits 3 but still prints the
    plan when the configuration does not fit in memory; the arguments must be valid all the same."""
    if name not in _PLANS:
        rc, out, err = _run_uniap(argv)
        ok = (0, 3) if argv[0] == "evaluate" else (0,)
        if rc not in ok or not out.strip():
            _PLANS[name] = None
            pytest.fail(f"uniap {' '.join(argv)} -> exit {rc}\n{err}")
        _PLANS[name] = Plan.from_dict(json.loads(out))
    plan = _PLANS[name]
    if plan is None:
        pytest.fail(f"uniap {' '.join(argv)} failed earlier in this session")
    assert plan.target == "megatron"
    return plan


def emitted(plan: Plan) -> tuple[list[str], dict[str, str], ModelSpec, TrainingSpec]:
    model, training = plan.model, plan.training
    launch = megatron_launch(plan)
    return launch.args + model_args(model, training), launch.env, model, training


# --- an independent statement of Megatron-LM's rules (frameworks.md 1.2, 1.4, 1.5, 5) ----------------

INT_FLAGS = {
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size", "--global-batch-size",
    "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers", "--recompute-num-layers",
    "--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups", "--ffn-hidden-size",
    "--kv-channels", "--seq-length", "--max-position-embeddings", "--vocab-size",
}
CHOICE_FLAGS = {
    "--recompute-granularity": {"full", "selective"},
    "--recompute-method": {"uniform", "block"},
    "--data-parallel-sharding-strategy": {"no_shard", "optim", "optim_grads", "optim_grads_params"},
    "--ckpt-format": {"torch", "torch_dist", "torch_dcp", "fsdp_dtensor"},
    "--normalization": {"LayerNorm", "RMSNorm"},
    # GPTModel(position_embedding_type=...) accepts these (megatron/core/models/gpt/gpt_model.py)
    "--position-embedding-type": set(typing.get_args(
        __import__("inspect").signature(GPTModel.__init__).parameters["position_embedding_type"].annotation))
    or {"learned_absolute", "rope", "mrope", "yarn", "none"},
}
STR_FLAGS = {"--pipeline-model-parallel-layout"}
SWITCHES = {
    "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--use-megatron-fsdp", "--use-torch-fsdp2", "--no-gradient-accumulation-fusion", "--bf16", "--fp16",
    "--group-query-attention", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
}
DEPRECATED = {"--model-parallel-size", "--batch-size", "--warmup", "--checkpoint-activations"}


def parse_flags(argv: list[str]) -> dict[str, object]:
    """Megatron-style `--flag value` / `--switch` words -> {flag: value or True}; every word must be a
    flag Megatron-LM core_v0.16.1 defines, given once, with a value of the right type."""
    flags: dict[str, object] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"stray word {flag!r} in {argv}"
        assert flag not in flags, f"{flag} given twice"
        assert flag not in DEPRECATED, f"{flag} is a deprecated Megatron flag (validate_args asserts it absent)"
        if flag in SWITCHES:
            flags[flag] = True
            i += 1
            continue
        assert flag in INT_FLAGS | STR_FLAGS | set(CHOICE_FLAGS), f"{flag} is not a Megatron-LM flag uniap may emit"
        assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{flag} needs a value"
        value = argv[i + 1]
        if flag in INT_FLAGS:
            assert re.fullmatch(r"\d+", value), f"{flag} {value!r} is not an integer"
            flags[flag] = int(value)
        else:
            if flag in CHOICE_FLAGS:
                assert value in CHOICE_FLAGS[flag], f"{flag} {value!r} not in {sorted(CHOICE_FLAGS[flag])}"
            flags[flag] = value
        i += 2
    return flags


def expand_layout(text: str) -> list[str]:
    """A layout string -> one string of layer letters per stage (frameworks.md 1.5: commas are cosmetic,
    `x*n` repeats a letter, `(...)*n` a group, `|` separates stages)."""
    text = text.replace(",", "")
    while "(" in text:
        text = re.sub(r"\(([^()]*)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text, count=1)
    out, i = [], 0
    while i < len(text):
        m = re.match(r"([A-Za-z|])\*(\d+)", text[i:])
        if m:
            out.append(m.group(1) * int(m.group(2)))
            i += m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out).split("|")


def megatron_violations(flags: dict, env: dict[str, str], world: int) -> list[str]:
    """Every rule of frameworks.md 1.4 / 5 that applies to these flags and this world size, as messages."""
    bad = []
    g = flags.get
    tp, pp = g("--tensor-model-parallel-size", 1), g("--pipeline-model-parallel-size", 1)
    mbs, gbs = g("--micro-batch-size"), g("--global-batch-size")
    layers, hidden, heads = g("--num-layers"), g("--hidden-size"), g("--num-attention-heads")
    ffn, seq = g("--ffn-hidden-size") or 4 * hidden, g("--seq-length")
    for name, v in (("TP", tp), ("PP", pp), ("MBS", mbs), ("GBS", gbs), ("L", layers), ("h", hidden),
                    ("heads", heads), ("seq", seq)):
        if not isinstance(v, int) or v < 1:
            bad.append(f"{name} must be a positive integer (got {v!r})")
    if bad:
        return bad
    # A.1 / C: world % (TP*PP*CP) == 0; DP = W/(TP*PP); GBS % (MBS*DP) == 0 with at least one micro-batch.
    if world % (tp * pp):
        bad.append(f"world {world} % (TP {tp} * PP {pp}) != 0")
        return bad
    dp = world // (tp * pp)
    if gbs % (mbs * dp) or gbs // (mbs * dp) < 1:
        bad.append(f"GBS {gbs} % (MBS {mbs} * DP {dp}) != 0")
    # B: heads % TP; query groups; ffn % TP; hidden % heads without kv_channels.
    if heads % tp:
        bad.append(f"heads {heads} % TP {tp} != 0")
    groups = g("--num-query-groups") if g("--group-query-attention") else heads
    if "--num-query-groups" in flags and not g("--group-query-attention"):
        bad.append("--num-query-groups without --group-query-attention is ignored by Megatron (MHA)")
    if not (groups % tp == 0 or tp % groups == 0):
        bad.append(f"query groups {groups} and TP {tp}: neither divides the other")
    if heads % groups:
        bad.append(f"heads {heads} % query groups {groups} != 0")
    if ffn % tp:
        bad.append(f"ffn {ffn} % TP {tp} != 0")
    if "--kv-channels" not in flags and hidden % heads:
        bad.append(f"hidden {hidden} % heads {heads} != 0 and no --kv-channels")
    # A.17: max_position_embeddings >= seq_length.
    if g("--max-position-embeddings", 0) < seq:
        bad.append(f"max_position_embeddings {g('--max-position-embeddings')} < seq {seq}")
    # A.20 / C: SP only with TP > 1 (TP 1 silently drops it); the sequence splits over the TP ranks.
    if g("--sequence-parallel"):
        if tp == 1:
            bad.append("--sequence-parallel at TP 1 (Megatron silently drops it: not what was planned)")
        elif seq % tp:
            bad.append(f"--sequence-parallel needs seq {seq} % TP {tp} == 0")
    # Pipeline split (A.6-9, B uneven PP and layout, C get_num_layers_to_build).
    first, last = g("--decoder-first-pipeline-num-layers"), g("--decoder-last-pipeline-num-layers")
    layout = g("--pipeline-model-parallel-layout")
    if layout is not None:
        if first is not None or last is not None:
            bad.append("a layout cannot be combined with --decoder-first/last-pipeline-num-layers")
        stages = expand_layout(layout)
        flat = "".join(stages)
        if set(flat) - set("ELt"):
            bad.append(f"layout letters {sorted(set(flat) - set('ELt'))} (only E, L, t for a GPT)")
        if len(stages) != pp:
            bad.append(f"layout has {len(stages)} stages, PP is {pp} (uniap never sets VPP)")
        if flat.count("E") != 1 or not stages[0].startswith("E"):
            bad.append("layout needs exactly one E, first in stage 0")
        if flat.count("L") != 1 or not stages[-1].endswith("L"):
            bad.append("layout needs exactly one L, last in the last stage")
        if flat.count("t") != layers:
            bad.append(f"layout has {flat.count('t')} decoder layers, --num-layers is {layers}")
    elif first is not None or last is not None:
        given = [x for x in (first, last) if x is not None]
        if pp < 2:
            bad.append("uneven first/last stage flags need PP > 1")
        if any(x <= 0 for x in given):
            bad.append(f"first/last stage layer counts must be > 0 (got {given})")
        mid_layers, mid_stages = layers - sum(given), pp - len(given)
        if bool(mid_layers) != bool(mid_stages):
            bad.append(f"{mid_layers} middle layers but {mid_stages} middle stages")
        elif mid_stages and mid_layers % mid_stages:
            bad.append(f"middle layers {mid_layers} % middle stages {mid_stages} != 0")
    elif layers % pp:
        bad.append(f"even split: num_layers {layers} % PP {pp} != 0")
    # Recompute (A.18-19, B): full needs method + count; selective forbids both.
    gran = g("--recompute-granularity")
    if gran == "full":
        if g("--recompute-method") not in ("uniform", "block") or not g("--recompute-num-layers"):
            bad.append("--recompute-granularity full needs --recompute-method and --recompute-num-layers >= 1")
    elif gran == "selective":
        if "--recompute-method" in flags or "--recompute-num-layers" in flags:
            bad.append("--recompute-granularity selective forbids --recompute-method/--recompute-num-layers")
    elif "--recompute-method" in flags or "--recompute-num-layers" in flags:
        bad.append("--recompute-method/--recompute-num-layers without a recompute granularity")
    # A.11: overlap-param-gather needs overlap-grad-reduce and the distributed optimizer or Megatron-FSDP.
    if g("--overlap-param-gather"):
        if not g("--overlap-grad-reduce"):
            bad.append("--overlap-param-gather without --overlap-grad-reduce")
        if not (g("--use-distributed-optimizer") or g("--use-megatron-fsdp")):
            bad.append("--overlap-param-gather without --use-distributed-optimizer or --use-megatron-fsdp")
    # A.14 / A.24 / 5: Megatron-FSDP needs --ckpt-format fsdp_dtensor (and fsdp_dtensor needs Megatron-FSDP),
    # CUDA_DEVICE_MAX_CONNECTIONS != 1; uniap's capability: only at PP = 1.
    mfsdp = bool(g("--use-megatron-fsdp"))
    if mfsdp:
        if g("--ckpt-format") != "fsdp_dtensor":
            bad.append("--use-megatron-fsdp needs --ckpt-format fsdp_dtensor")
        if pp != 1:
            bad.append(f"Megatron-FSDP at PP {pp} (the capability declares FSDP only at PP 1)")
        if env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
            bad.append("Megatron-FSDP with CUDA_DEVICE_MAX_CONNECTIONS=1")
    if g("--ckpt-format") == "fsdp_dtensor" and not mfsdp:
        bad.append("--ckpt-format fsdp_dtensor needs --use-megatron-fsdp")
    # A.12: FSDP2.
    tfsdp = bool(g("--use-torch-fsdp2"))
    if tfsdp:
        if pp != 1 or g("--use-distributed-optimizer") or g("--fp16") \
                or not g("--no-gradient-accumulation-fusion") or not g("--untie-embeddings-and-output-weights") \
                or g("--ckpt-format", "torch_dist") not in ("torch_dist", "torch_dcp") \
                or env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
            bad.append("--use-torch-fsdp2 requirements (A.12) not met")
    if mfsdp and tfsdp:
        bad.append("both FSDP implementations")
    # A.22: TP > 1 (pre-Blackwell) asserts CUDA_DEVICE_MAX_CONNECTIONS == "1" unless FSDP (which warns).
    if tp > 1 and not (mfsdp or tfsdp) and env.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        bad.append("TP > 1 without FSDP needs CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment")
    # A.15: fp16 xor bf16.
    if g("--bf16") and g("--fp16"):
        bad.append("--bf16 and --fp16 together")
    if set(env) - {"CUDA_DEVICE_MAX_CONNECTIONS"}:
        bad.append(f"unexpected environment {sorted(env)}")
    return bad


def expected_stage_counts(flags: dict) -> list[int]:
    """Transformer layers per pipeline stage as Megatron derives them from the flags (frameworks.md 1.4 C)."""
    layers, pp = flags["--num-layers"], flags.get("--pipeline-model-parallel-size", 1)
    if "--pipeline-model-parallel-layout" in flags:
        return [stage.count("t") for stage in expand_layout(flags["--pipeline-model-parallel-layout"])]
    first = flags.get("--decoder-first-pipeline-num-layers")
    last = flags.get("--decoder-last-pipeline-num-layers")
    mid_stages = pp - (first is not None) - (last is not None)
    mid = (layers - (first or 0) - (last or 0)) // mid_stages if mid_stages else 0
    counts = [mid] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def split_encoding(flags: dict) -> str:
    if "--pipeline-model-parallel-layout" in flags:
        return "layout"
    if "--decoder-first-pipeline-num-layers" in flags or "--decoder-last-pipeline-num-layers" in flags:
        return "first/last"
    return "even"


def translation_mismatches(flags: dict, plan: Plan, model: ModelSpec, training: TrainingSpec) -> list[str]:
    """The arguments say what the plan and the model say."""
    s = plan.uniform_strategy
    world = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    g = flags.get
    want = {
        "--tensor-model-parallel-size": s.tp, "--pipeline-model-parallel-size": plan.pipeline_degree,
        "--global-batch-size": training.global_batch_size, "--micro-batch-size": plan.micro_batch_all_replicas // s.dp,
        "--num-layers": model.num_layers, "--hidden-size": model.hidden_size,
        "--num-attention-heads": model.num_attention_heads, "--ffn-hidden-size": model.ffn_hidden_size,
        "--seq-length": training.seq_length, "--max-position-embeddings": model.max_position_embeddings,
        "--vocab-size": model.vocab_size,
    }
    bad = [f"{k} {g(k)!r}, expected {v!r}" for k, v in want.items() if g(k) != v]
    dp = world // (s.tp * plan.pipeline_degree)
    if dp != s.dp:
        bad.append(f"Megatron's DP {dp} != plan DP {s.dp}")
    if training.global_batch_size // (g("--micro-batch-size") * dp) != plan.micro_batches:
        bad.append("Megatron's micro-batch count differs from the plan's")
    groups = g("--num-query-groups") if g("--group-query-attention") else model.num_attention_heads
    if groups != model.query_groups:
        bad.append(f"query groups {groups}, model has {model.query_groups}")
    if g("--kv-channels", model.hidden_size // model.num_attention_heads) != model.head_dim:
        bad.append("kv channels differ from the model's head dim")
    for flag, cond in (("--swiglu", model.gated_mlp),
                       ("--untie-embeddings-and-output-weights", not model.tied_embeddings),
                       ("--disable-bias-linear", not model.add_bias), ("--sequence-parallel", s.tp > 1),
                       ("--bf16", training.precision == "bf16"), ("--fp16", training.precision == "fp16")):
        if bool(g(flag)) != cond:
            bad.append(f"{flag} {'missing' if cond else 'unexpected'}")
    if g("--normalization", "LayerNorm") != {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[model.normalization]:
        bad.append("normalization differs")
    if (g("--position-embedding-type", "learned_absolute") == "rope") != (model.position_embedding == "rope"):
        bad.append("position embedding differs")
    rc = {"none": None, "selective": "selective", "full": "full"}[s.recompute]
    if g("--recompute-granularity") != rc:
        bad.append(f"recompute {g('--recompute-granularity')!r}, plan says {s.recompute}")
    # ZeRO: 1 -> distributed optimizer; 3 -> Megatron-FSDP (optim_grads_params); 0 -> neither.
    zero = 3 if g("--use-megatron-fsdp") else 1 if g("--use-distributed-optimizer") else 0
    if zero != (s.zero if s.dp > 1 else 0):
        bad.append(f"ZeRO stage {zero} in the arguments, plan says {s.zero}")
    if zero == 3 and g("--data-parallel-sharding-strategy") != "optim_grads_params":
        bad.append("Megatron-FSDP as ZeRO-3 must shard optimizer states, gradients and parameters")
    if expected_stage_counts(flags) != plan.stage_layer_counts():
        bad.append(f"stage layers {expected_stage_counts(flags)} != plan {plan.stage_layer_counts()}")
    return bad


# --- megatron-core's own validation --------------------------------------------------------------------

def transformer_config(flags: dict) -> TransformerConfig:
    """TransformerConfig as Megatron-LM's core_transformer_config_from_args builds it from these flags."""
    g = flags.get
    dtype = torch.bfloat16 if g("--bf16") else torch.float16 if g("--fp16") else torch.float32
    return TransformerConfig(
        num_layers=g("--num-layers"), hidden_size=g("--hidden-size"), num_attention_heads=g("--num-attention-heads"),
        num_query_groups=g("--num-query-groups") if g("--group-query-attention") else None,
        ffn_hidden_size=g("--ffn-hidden-size"), kv_channels=g("--kv-channels"),
        tensor_model_parallel_size=g("--tensor-model-parallel-size", 1),
        pipeline_model_parallel_size=g("--pipeline-model-parallel-size", 1),
        sequence_parallel=bool(g("--sequence-parallel")),
        num_layers_in_first_pipeline_stage=g("--decoder-first-pipeline-num-layers"),
        num_layers_in_last_pipeline_stage=g("--decoder-last-pipeline-num-layers"),
        pipeline_model_parallel_layout=g("--pipeline-model-parallel-layout"),
        recompute_granularity=g("--recompute-granularity"), recompute_method=g("--recompute-method"),
        recompute_num_layers=g("--recompute-num-layers"),
        bf16=bool(g("--bf16")), fp16=bool(g("--fp16")), params_dtype=dtype, pipeline_dtype=dtype,
        gated_linear_unit=bool(g("--swiglu")), add_bias_linear=not g("--disable-bias-linear"),
        normalization=g("--normalization", "LayerNorm"),
        gradient_accumulation_fusion=not g("--no-gradient-accumulation-fusion"),
        use_cpu_initialization=True)


def core_stage_layers(config: TransformerConfig) -> tuple[list[int], list[int]]:
    """(layers to build, first layer's offset) per pipeline rank, from megatron-core."""
    pp = config.pipeline_model_parallel_size
    layout = config.pipeline_model_parallel_layout
    if layout is not None:  # the layout path reads the PP rank from parallel_state unless given directly
        return ([layout.get_num_layers_to_build(LayerType.decoder, pp_rank=i) for i in range(pp)],
                [layout.get_layer_offset(LayerType.decoder, pp_rank=i) for i in range(pp)])
    return ([get_num_layers_to_build(config, pp_rank=i) for i in range(pp)],
            [get_transformer_layer_offset(config, pp_rank=i) for i in range(pp)])


DDP_FLAGS = {"--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--use-megatron-fsdp",
             "--data-parallel-sharding-strategy"}


def ddp_config(flags: dict) -> DistributedDataParallelConfig:
    """DistributedDataParallelConfig from the same-named arguments (as Megatron-LM's training.py copies them)."""
    known = {f.name for f in fields(DistributedDataParallelConfig)}
    kwargs = {}
    for flag in DDP_FLAGS & set(flags):
        dest = flag[2:].replace("-", "_")
        assert dest in known, f"{flag} has no DistributedDataParallelConfig field {dest}"
        kwargs[dest] = flags[flag]
    return DistributedDataParallelConfig(**kwargs)


# --- tests over every plan --------------------------------------------------------------------------

@pytest.mark.parametrize("name,argv", ALL_JOBS, ids=[n for n, _ in ALL_JOBS])
def test_arguments_follow_megatron_rules(name, argv):
    plan = get_plan(name, argv)
    words, env, model, training = emitted(plan)
    flags = parse_flags(words)
    world = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    assert megatron_violations(flags, env, world) == [], words
    assert translation_mismatches(flags, plan, model, training) == [], words


@pytest.mark.parametrize("name,argv", ALL_JOBS, ids=[n for n, _ in ALL_JOBS])
def test_megatron_core_accepts_arguments(name, argv):
    plan = get_plan(name, argv)
    words, _env, model, _training = emitted(plan)
    flags = parse_flags(words)
    counts = plan.stage_layer_counts()
    if "--pipeline-model-parallel-layout" in flags:  # megatron-core's parser (frameworks.md 1.5)
        layout = PipelineParallelLayerLayout(flags["--pipeline-model-parallel-layout"], plan.pipeline_degree)
        assert layout.virtual_pipeline_model_parallel_size == 1
        layout.validate_layer_layout(num_layers=model.num_layers, mtp_num_layers=None)
        assert [layout.layout[i][0].count(LayerType.decoder) for i in range(plan.pipeline_degree)] == counts
        assert layout.layout[0][0][0] == LayerType.embedding and layout.layout[-1][0][-1] == LayerType.loss
    config = transformer_config(flags)  # __post_init__ validates
    assert config.num_query_groups == model.query_groups
    assert config.ffn_hidden_size == model.ffn_hidden_size and config.kv_channels == model.head_dim
    assert config.sequence_parallel == (plan.uniform_strategy.tp > 1)
    assert config.virtual_pipeline_model_parallel_size is None
    build, offsets = core_stage_layers(config)
    assert build == counts
    assert offsets == [sum(counts[:i]) for i in range(len(counts))]
    ddp_config(flags)


@pytest.mark.parametrize("name,argv", ALL_JOBS, ids=[n for n, _ in ALL_JOBS])
def test_arguments_parse_back_to_the_job(name, argv):
    """job_from_args(arguments) recovers the model, the training job and, as pins, the plan's choices."""
    plan = get_plan(name, argv)
    words, _env, model, training = emitted(plan)
    job = job_from_args(words)
    m = job.model
    for field in ("architecture", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "vocab_size", "gated_mlp", "normalization", "tied_embeddings", "max_position_embeddings",
                  "add_bias", "head_dim", "query_groups"):
        assert getattr(m, field) == getattr(model, field), field
    assert (m.position_embedding == "rope") == (model.position_embedding == "rope")
    assert (job.training.global_batch_size, job.training.seq_length, job.training.precision) == \
        (training.global_batch_size, training.seq_length, training.precision)
    s = plan.uniform_strategy
    pins = job.pins
    assert (pins.tp, pins.pipeline_degree, pins.micro_batch_per_replica) == \
        (s.tp, plan.pipeline_degree, plan.micro_batch_all_replicas // s.dp)
    assert pins.zero == (s.zero if s.dp > 1 and s.zero else None)
    assert pins.recompute == (None if s.recompute == "none" else s.recompute)


CUSTOM_MODEL = """\
name: kv-mqa-decoder
architecture: decoder
num_layers: 18
hidden_size: 3072
num_attention_heads: 16
num_query_groups: 1
kv_channels: 256
ffn_hidden_size: 24576
vocab_size: 256000
gated_mlp: true
normalization: rmsnorm
tied_embeddings: true
position_embedding: rope
max_position_embeddings: 8192
add_bias: false
"""


@pytest.mark.parametrize("pins", [["--tp", "4"], ["--pp", "4"], ["--zero", "3"]])
def test_explicit_kv_channels_and_multi_query_attention(tmp_path, pins):
    """A model whose head dim is not hidden/heads (--kv-channels) with one query group (MQA, TP > groups),
    tied embeddings: the same three checks as the grid."""
    path = tmp_path / "model.yaml"
    path.write_text(CUSTOM_MODEL)
    name = f"custom-{'-'.join(pins)}"
    plan = get_plan(name, ["plan", "--model", str(path), "--cluster", "dgx-a100-80g", "--gpus-per-node", "8",
                           "--global-batch-size", "32", "--seq-length", "4096", "--target", "megatron", *pins])
    words, env, model, training = emitted(plan)
    flags = parse_flags(words)
    assert flags["--kv-channels"] == 256 and flags["--num-query-groups"] == 1 and flags["--group-query-attention"]
    assert "--untie-embeddings-and-output-weights" not in flags
    assert megatron_violations(flags, env, 8) == []
    assert translation_mismatches(flags, plan, model, training) == []
    config = transformer_config(flags)
    assert (config.kv_channels, config.num_query_groups) == (256, 1)
    assert core_stage_layers(config)[0] == plan.stage_layer_counts()
    job = job_from_args(words)
    assert (job.model.kv_channels, job.model.num_query_groups, job.model.tied_embeddings) == (256, 1, True)


def test_grid_covers_every_split_encoding_and_parallelism():
    """The grid is not vacuous: all three split encodings (first/last with both ends, only the first,
    only the last), TP, PP, DP, ZeRO-1, Megatron-FSDP, both recompute modes and all precisions occur."""
    seen: dict[str, set] = {k: set() for k in ("split", "tp", "pp", "dp", "zero", "recompute", "precision")}
    for name, argv in ALL_JOBS:
        plan = get_plan(name, argv)
        flags = parse_flags(emitted(plan)[0])
        s = plan.uniform_strategy
        seen["split"].add(split_encoding(flags))
        seen["tp"].add(s.tp)
        seen["pp"].add(plan.pipeline_degree)
        seen["dp"].add(s.dp)
        seen["zero"].add(s.zero)
        seen["recompute"].add(s.recompute)
        seen["precision"].add(plan.training.precision)
        if split_encoding(flags) == "first/last":
            seen["split"].add("first only" if "--decoder-last-pipeline-num-layers" not in flags else
                              "last only" if "--decoder-first-pipeline-num-layers" not in flags else "first+last")
    assert seen["split"] == {"even", "first/last", "layout", "first only", "last only", "first+last"}
    assert {1, 2, 4, 8} <= seen["tp"] and {1, 2, 4, 8} <= seen["pp"] and {1, 2} <= seen["dp"]
    assert seen["zero"] >= {0, 1, 3}
    assert seen["recompute"] == {"none", "selective", "full"}
    assert seen["precision"] == {"bf16", "fp16", "fp32"}


def test_rule_checker_catches_broken_arguments():
    """The checker above is not vacuous: each mutation of good arguments breaks the rule it targets."""
    plan = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7"))
    words, env, _model, _training = emitted(plan)
    good = parse_flags(words)
    assert megatron_violations(good, env, 8) == []

    def broken(**changes):
        f = dict(good)
        for k, v in changes.items():
            flag = "--" + k.replace("_", "-")
            if v is None:
                f.pop(flag, None)
            else:
                f[flag] = v
        return megatron_violations(f, env, 8)

    assert broken(tensor_model_parallel_size=3)  # world % (TP*PP)
    assert broken(global_batch_size=15)  # GBS % (MBS*DP)
    assert broken(decoder_first_pipeline_num_layers=10)  # middle layers don't split evenly
    assert broken(pipeline_model_parallel_size=8, decoder_first_pipeline_num_layers=None,
                  decoder_last_pipeline_num_layers=None, num_layers=30)  # 30 % 8, even split
    assert broken(pipeline_model_parallel_layout="Et*9|t*8|t*8|t*7L")  # layout + first/last
    assert broken(decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                  pipeline_model_parallel_layout="Et*9|t*8|t*8|t*6L")  # 31 t for 32 layers
    assert broken(decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                  pipeline_model_parallel_layout="t*9|Et*8|t*8|t*7L")  # E not first
    assert broken(recompute_granularity="full")  # no method / count
    assert broken(recompute_granularity="selective", recompute_method="uniform")
    assert broken(overlap_param_gather=True)  # without grad-reduce / dist-opt
    assert broken(use_megatron_fsdp=True)  # no fsdp_dtensor, PP > 1
    assert broken(fp16=True)  # with --bf16
    assert broken(sequence_parallel=True)  # at TP 1
    assert broken(num_attention_heads=30)  # hidden % heads
    assert broken(group_query_attention=True, num_query_groups=5)  # heads % groups
    assert broken(group_query_attention=True, num_query_groups=3, tensor_model_parallel_size=2,
                  pipeline_model_parallel_size=4, global_batch_size=16, micro_batch_size=1)  # 3 vs TP 2
    assert broken(ffn_hidden_size=11007, tensor_model_parallel_size=2, micro_batch_size=1)  # ffn % TP
    assert broken(max_position_embeddings=1024)  # < seq 2048
    assert broken(recompute_num_layers=1)  # without a granularity
    words_tp, env_tp, *_ = emitted(get_plan(*eval_job("-1x8-tp-2-pp-4-split-9,8,8,7")))
    assert megatron_violations(parse_flags(words_tp), {}, 8)  # TP 2 without CUDA_DEVICE_MAX_CONNECTIONS=1
    f = parse_flags(words_tp)
    f["--seq-length"] = 2047
    assert megatron_violations(f, env_tp, 8)  # SP with seq % TP != 0


# --- splits the evaluator cannot make (an empty first or last stage) ----------------------------------

@pytest.mark.parametrize("counts", [
    [0, 16, 16], [16, 16, 0], [0, 8, 8, 8, 8], [8, 8, 8, 8, 0], [0, 31, 1], [1, 31, 0], [0, 32], [32, 0],
    [0, 4, 4, 4, 4, 4, 3, 1], [5, 0, 27], [9, 8, 8, 7], [8, 8, 8, 8], [3, 13, 13, 3], [1, 2, 3, 26],
])
def test_split_encoding_of_any_counts_is_valid_for_megatron_core(counts):
    """pipeline_split_args on arbitrary counts (zeros included: the planner may leave the embedding alone
    on the first stage) gives arguments megatron-core accepts and that build exactly these counts."""
    layers, pp = sum(counts), len(counts)
    flags = parse_flags(["--num-layers", str(layers), "--hidden-size", "256", "--num-attention-heads", "8",
                         "--seq-length", "128", "--max-position-embeddings", "128",
                         "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
                         "--global-batch-size", "4", *pipeline_split_args(counts)])
    assert megatron_violations(flags, {}, pp) == []
    assert expected_stage_counts(flags) == counts
    if 0 in (counts[0], counts[-1]):
        assert split_encoding(flags) == "layout"  # the first/last flags must be > 0
    build, offsets = core_stage_layers(transformer_config(flags))
    assert build == counts and offsets == [sum(counts[:i]) for i in range(pp)]


def test_planner_plan_with_an_embedding_only_stage(tmp_path):
    """A plan whose first stage holds only the embedding (the planner can choose this) becomes a layout
    that starts with a stage of just E."""
    plan = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7"))
    data = plan.to_dict()
    transformer = [lp for lp in data["layers"] if lp["kind"] == "transformer"]
    for lp in data["layers"]:  # embedding alone on stage 0; 32 transformer layers 11/11/10 on 1..3
        if lp["kind"] == "transformer":
            lp["stage"] = 1 + min(transformer.index(lp) // 11, 2)
        elif lp["kind"] != "embedding":
            lp["stage"] = 3
    moved = Plan.from_dict(data)
    assert moved.stage_layer_counts() == [0, 11, 11, 10]
    flags = parse_flags(emitted(moved)[0])
    assert expand_layout(flags["--pipeline-model-parallel-layout"])[0] == "E"
    assert megatron_violations(flags, megatron_launch(moved).env, 8) == []
    build, _ = core_stage_layers(transformer_config(flags))
    assert build == [0, 11, 11, 10]


def test_evaluate_refuses_an_empty_stage():
    for split in ("0,16,16", "16,16,0"):
        rc, _out, err = _run_uniap(["evaluate", "--model", "llama2-7b", "--gpus-per-node", "6",
                                    "--global-batch-size", "12", "--seq-length", "1024", "--target", "megatron",
                                    "--pp", "3", "--split", split])
        assert rc == 2 and "empty" in err


# --- plans Megatron cannot run are refused -------------------------------------------------------------

def test_launch_refuses_a_generic_plan_with_fsdp_and_pipelining():
    rc, out, err = _run_uniap(["evaluate", "--model", "llama2-7b", "--gpus-per-node", "8", "--global-batch-size", "16",
                               "--seq-length", "2048", "--target", "generic", "--pp", "2", "--zero", "3"])
    assert rc == 0, err
    with pytest.raises(SpecError, match="not runnable by Megatron-LM"):
        megatron_launch(Plan.from_dict(json.loads(out)))


@pytest.mark.parametrize("change", [{"tp": 2, "dp": 1, "zero": 0}, {"recompute": "full"}])
def test_launch_refuses_non_uniform_transformer_strategies(change):
    """Megatron has one TP degree and one recompute setting for all layers."""
    data = get_plan(*eval_job("llama2-7b-1x8-pp-4-split-9,8,8,7")).to_dict()
    layer = next(lp for lp in data["layers"] if lp["kind"] == "transformer" and lp["stage"] == 1)
    layer["strategy"].update(change)
    with pytest.raises(SpecError):
        megatron_launch(Plan.from_dict(data))


# --- sequence parallelism needs seq % TP == 0 (the bug this file found) -------------------------------

def test_megatron_core_rejects_sequence_parallel_scatter_of_an_odd_sequence():
    """The rule, from megatron-core itself: the sequence-parallel scatter asserts dim 0 % TP == 0."""
    from megatron.core.tensor_parallel.mappings import _split_along_first_dim

    class Group:  # the two methods the split reads from a process group
        def size(self):
            return 2

        def rank(self):
            return 0

    assert _split_along_first_dim(torch.zeros(1000, 1, 8), Group()).shape[0] == 500
    with pytest.raises(AssertionError, match="divisible by tensor parallel size"):
        _split_along_first_dim(torch.zeros(1001, 1, 8), Group())


@pytest.mark.parametrize("command,extra", [
    ("evaluate", ["--tp", "2"]),
    ("plan", ["--tp", "4"]),
])
def test_tp_not_dividing_the_sequence_never_reaches_megatron(command, extra):
    """TP 2 or 4 with a 1001-token sequence would get --sequence-parallel, which megatron-core rejects at
    the first forward. Either the core refuses to make the plan (it now knows the rule), or
    megatron_launch refuses the plan it made; the arguments are never emitted."""
    rc, out, err = _run_uniap([command, "--model", "gpt3-1.3b", "--gpus-per-node", "4", "--global-batch-size", "8",
                               "--seq-length", "1001", "--target", "megatron", *extra])
    if rc != 0:
        assert rc in (2, 3) and "Traceback" not in err and "internal error" not in err
        return
    plan = Plan.from_dict(json.loads(out))
    assert plan.uniform_strategy.tp > 1
    with pytest.raises(SpecError, match="sequence"):
        megatron_launch(plan)


@pytest.mark.parametrize("seq", [1001, 2047, 2049])
def test_launch_refuses_a_plan_whose_tp_does_not_divide_the_sequence(seq):
    """A plan made elsewhere (an older uniap, an edited file) with TP 2 and an odd sequence is refused
    with an error that names the rule, instead of arguments that crash in the sequence-parallel scatter."""
    data = get_plan(*eval_job("-1x8-tp-2-pp-4-split-9,8,8,7")).to_dict()
    data["training"]["seq_length"] = seq
    with pytest.raises(SpecError, match="seq_length % TP") as exc:
        megatron_launch(Plan.from_dict(data))
    assert "divisible by 2" in exc.value.hint
    data["training"]["seq_length"] = seq - seq % 2
    assert "--sequence-parallel" in megatron_launch(Plan.from_dict(data)).args


# --- Megatron command line -> job ---------------------------------------------------------------------

# Llama-2-70B pretraining with pretrain_gpt.py (Megatron-LM examples style): GQA, SwiGLU, RMSNorm, RoPE,
# untied embeddings, no bias, plus many flags uniap does not read.
LLAMA2_70B_ARGV = """
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
--group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 4096
--tokenizer-type Llama2Tokenizer --tokenizer-model /data/llama2/tokenizer.model --vocab-size 32000
--position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
--untie-embeddings-and-output-weights --disable-bias-linear --no-position-embedding
--no-masked-softmax-fusion --attention-dropout 0.0 --hidden-dropout 0.0
--micro-batch-size 1 --global-batch-size 1024 --train-iters 250000 --lr 3.0e-4 --min-lr 3.0e-5
--lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
--clip-grad 1.0 --init-method-std 0.02 --bf16 --use-flash-attn --recompute-activations
--data-path 1.0 /data/redpajama/text_document --split 99,1,0 --log-interval 10 --save-interval 1000
--eval-interval 1000 --eval-iters 10 --save /ckpt --load /ckpt --distributed-backend nccl
""".split()


def test_job_from_llama2_command_line():
    job = job_from_args(LLAMA2_70B_ARGV, name="llama2-70b-cli")
    m = job.model
    assert (m.name, m.architecture, m.num_layers, m.hidden_size, m.num_attention_heads) == \
        ("llama2-70b-cli", "decoder", 80, 8192, 64)
    assert (m.num_query_groups, m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == (8, 28672, 32000, 4096)
    assert m.gated_mlp and m.normalization == "rmsnorm" and m.position_embedding == "rope"
    assert not m.tied_embeddings and not m.add_bias and m.dropout == 0.0
    assert m.head_dim == 128
    preset = MODEL_PRESETS["llama2-70b"]
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "vocab_size", "gated_mlp", "normalization", "tied_embeddings", "position_embedding",
                  "max_position_embeddings", "add_bias"):
        assert getattr(m, field) == getattr(preset, field), field
    t = job.training
    assert (t.global_batch_size, t.seq_length, t.precision) == (1024, 4096, "bf16")
    p = job.pins
    assert (p.tp, p.pipeline_degree, p.zero, p.recompute, p.micro_batch_per_replica) == (8, 4, 1, "selective", 1)


def test_job_from_args_pins_only_what_was_given():
    argv = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
            "--max-position-embeddings", "2048", "--global-batch-size", "512"]
    job = job_from_args(argv)
    p = job.pins
    assert (p.tp, p.pipeline_degree, p.zero, p.recompute, p.micro_batch_per_replica) == (None,) * 5
    m = job.model
    assert m.ffn_hidden_size == 4 * 2048 and m.num_query_groups is None and m.query_groups == 16
    assert m.tied_embeddings and m.add_bias and m.normalization == "layernorm" and m.position_embedding == "learned"
    assert job.training.precision == "fp32"
    # An explicit degree is a pin, even the default value 1.
    p = job_from_args(argv + ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]).pins
    assert (p.tp, p.pipeline_degree) == (1, 2)
    assert job_from_args(argv + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                 "--recompute-num-layers", "1"]).pins.recompute == "full"
    assert job_from_args(argv + ["--use-torch-fsdp2"]).pins.zero == 3
    assert job_from_args(argv + ["--use-megatron-fsdp", "--use-distributed-optimizer"]).pins.zero == 3
    assert job_from_args(argv + ["--fp16"]).training.precision == "fp16"


def test_job_from_args_follows_megatron_defaults():
    base = ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--seq-length", "4096",
            "--global-batch-size", "64"]
    # --num-query-groups reaches the model only with --group-query-attention (frameworks.md 1.3).
    assert job_from_args(base + ["--num-query-groups", "8"]).model.num_query_groups is None
    assert job_from_args(base + ["--group-query-attention"]).model.num_query_groups == 1  # argparse default 1
    # --swiglu without --ffn-hidden-size: int((4h * 2/3) / 64) * 64 (arguments.py:803-811).
    assert job_from_args(base + ["--swiglu"]).model.ffn_hidden_size == int((4 * 4096 * 2 / 3) / 64) * 64 == 10880
    # max_position_embeddings defaults to the sequence; --padded-vocab-size wins over --vocab-size.
    job = job_from_args(base + ["--vocab-size", "32000", "--padded-vocab-size", "32768"])
    assert job.model.max_position_embeddings == 4096 and job.model.vocab_size == 32768
    # No abbreviations (Megatron's parser has allow_abbrev=False): --num-layer is not --num-layers.
    with pytest.raises(SpecError):
        job_from_args(["--num-layer", "32"] + base[2:])


def test_job_from_args_plans_with_the_kernels_of_this_environment():
    """The plugin and `uniap-megatron run` plan where the job runs: without Transformer Engine or Apex (as here)
    megatron-core steps with torch's foreach AdamW, and the plan must count its temporary."""
    job = job_from_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length",
                         "128", "--global-batch-size", "8"])
    assert job.training.fused_kernels == fused_kernels_available()
    if importlib.util.find_spec("transformer_engine") is None and importlib.util.find_spec("apex") is None:
        assert job.training.fused_kernels is False


@pytest.mark.parametrize("drop", ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                                  "--global-batch-size"])
def test_job_from_args_requires_the_shape_and_batch(drop):
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--global-batch-size", "8"]
    i = argv.index(drop)
    with pytest.raises(SpecError, match=drop):
        job_from_args(argv[:i] + argv[i + 2:])


def test_job_from_args_rejects_bf16_with_fp16():
    with pytest.raises(SpecError, match="mutually exclusive"):
        job_from_args(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                       "--global-batch-size", "8", "--bf16", "--fp16"])


# --- world size from the launcher ---------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_world_size_from_launcher_flags_wins(clean_env):
    clean_env.setenv("WORLD_SIZE", "64")
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    assert world_size(2, 4) == (2, 4)


@pytest.mark.parametrize("world,local,expected", [
    ("16", "8", (2, 8)), ("32", "8", (4, 8)), ("8", "8", (1, 8)), ("4", None, (1, 4)), ("6", "4", (1, 6)),
    ("8", "0", (1, 8)), ("8", "", (1, 8)),
])
def test_world_size_from_torchrun_environment(clean_env, world, local, expected):
    clean_env.setenv("WORLD_SIZE", world)
    if local is not None:
        clean_env.setenv("LOCAL_WORLD_SIZE", local)
    assert world_size() == expected


@pytest.mark.parametrize("world", [None, "", "0"])
def test_world_size_unknown_is_an_error(clean_env, world):
    if world is not None:
        clean_env.setenv("WORLD_SIZE", world)
    with pytest.raises(SpecError, match="world size"):
        world_size()


def test_model_args_refuses_non_decoder():
    with pytest.raises(SpecError, match="decoder"):
        model_args(MODEL_PRESETS["bert-large"], TrainingSpec(global_batch_size=8, seq_length=512))


def test_grid_ids_are_unique():
    names = [n for n, _ in ALL_JOBS]
    assert len(names) == len(set(names)) >= 150
