"""Plan -> DeepSpeed 0.19 JSON config: a thin translation (the planning happened in the core).

Batch identity (ds/runtime/config.py): train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x data-parallel size; the pipeline engine runs gradient_accumulation_steps
micro-batches per step. Keys DeepSpeed does not read are not emitted, except the top-level "uniap"
section (DeepSpeed ignores unknown top-level keys) that carries the plan's pipeline split and
prediction for the training script and for humans.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from uniap.cluster.spec import load_cluster
from uniap.cost.strategy import OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, Pins, Strategy
from uniap.errors import SpecError
from uniap.io import read_text
from uniap.model.loaders import load_model
from uniap.plan import Plan
from uniap.planner import Job, ineffective_pins
from uniap.model.spec import training_spec
from uniap.planner import plan as solve

from .merge import DATA_TYPES, GRAD_ACCUM_DTYPE, base_job, merge_config
from .capability import DEEPSPEED, STAGE3_MAX_LIVE_PARAMETERS, STAGE3_MAX_REUSE_DISTANCE, zero_buckets


log = logging.getLogger("uniap.deepspeed")
PAD_VOCAB_TO = 64  # what Hugging Face's resize_token_embeddings(pad_to_multiple_of=...) is usually given
DEFAULT_BATCH = 512
DEFAULT_PRECISION = "bf16"
OFFLOAD_DEVICE = "cpu"  # DeepSpeed also offloads to NVMe (ZeRO-Infinity); uniap prices host memory only
# zero_optimization's sections for each offloaded part (DeepSpeed 0.19.8 runtime/zero/offload_config.py): offloading
# the parameters offloads the optimizer too, so OFFLOAD_PARAMS writes both.
OFFLOAD_KEYS = {OFFLOAD_OPTIMIZER: "offload_optimizer", OFFLOAD_PARAMS: "offload_param"}
# ZeRO++'s three parts (runtime/zero/config.py): int8 weights, the hpZ secondary partition's size, int4 gradients.
QUANTIZED_WEIGHTS, HPZ_PARTITION_SIZE, QUANTIZED_GRADIENTS = (
    "zero_quantized_weights",
    "zero_hpz_partition_size",
    "zero_quantized_gradients",
)


def zero_section(strategy: Strategy, pipeline: bool, hidden_size: int, gpus_per_node: int) -> dict[str, Any]:
    """zero_optimization for the strategy's ZeRO stage and variant, its buckets sized to the model
    (capability.zero_buckets); overlap_comm is off under a pipeline (the engine forces it off)."""
    stage = strategy.zero
    if stage == 0:
        return {"stage": 0}
    buckets = zero_buckets(hidden_size)
    section: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": not pipeline,
        "reduce_scatter": True,
        "reduce_bucket_size": buckets["reduce_bucket_size"],
    }
    if stage in (1, 2):
        section["allgather_bucket_size"] = buckets["allgather_bucket_size"]
    if stage == 3:
        section.update(
            {
                "stage3_prefetch_bucket_size": buckets["stage3_prefetch_bucket_size"],
                "stage3_param_persistence_threshold": buckets["stage3_param_persistence_threshold"],
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
                "stage3_max_reuse_distance": STAGE3_MAX_REUSE_DISTANCE,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return section | variant_keys(strategy, gpus_per_node)


def variant_keys(strategy: Strategy, gpus_per_node: int) -> dict[str, Any]:
    """The zero_optimization keys of the strategy's variant (DeepSpeed 0.19.8 runtime/zero/config.py,
    offload_config.py): host memory pinned for offloading; ZeRO++'s three parts with the secondary partition
    over a node. (MiCS was removed in DeepSpeed 0.19: runtime/config.py _REMOVED_ZERO_CONFIG_KEYS refuses
    mics_shard_size.)"""
    if strategy.offload != OFFLOAD_NONE:
        parts = (
            OFFLOAD_KEYS if strategy.offload == OFFLOAD_PARAMS else {OFFLOAD_OPTIMIZER: OFFLOAD_KEYS[OFFLOAD_OPTIMIZER]}
        )
        return {key: {"device": OFFLOAD_DEVICE, "pin_memory": True} for key in parts.values()}
    if strategy.zeropp:
        return {
            QUANTIZED_WEIGHTS: True,
            HPZ_PARTITION_SIZE: min(gpus_per_node, strategy.shards),
            QUANTIZED_GRADIENTS: True,
        }
    return {}


def deepspeed_config(plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config of a plan made for (or runnable by) the deepspeed target."""
    problems = DEEPSPEED.violations([(lp.kind, lp.strategy) for lp in plan.layers], plan.pipeline_degree)
    if problems:
        raise SpecError(
            f"plan (target '{plan.target}') is not runnable by DeepSpeed: {problems[0]}",
            "re-plan with --target deepspeed",
        )
    strategy = plan.uniform_strategy or plan.layers[0].strategy
    pipeline = plan.pipeline_degree > 1
    recompute = strategy.recompute == "full"
    config: dict[str, Any] = {
        "train_batch_size": plan.training.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_per_replica,
        "gradient_accumulation_steps": plan.micro_batches,
        "zero_optimization": zero_section(strategy, pipeline, plan.model.hidden_size, plan.cluster.gpus_per_node),
        "steps_per_print": 10,
        "wall_clock_breakdown": False,
    }
    precision = plan.training.precision
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if recompute:
        config["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
        }
    if pipeline and precision == "bf16" and strategy.zero == 1 and strategy.offload == OFFLOAD_NONE:
        config[DATA_TYPES] = {GRAD_ACCUM_DTYPE: "fp32"}  # fp32 accumulation (capability.py: BF16_Optimizer)
    if pipeline:
        config["pipeline"] = {
            "activation_checkpoint_interval": 1 if recompute else 0,
            "pipe_partitioned": True,
            "grad_partitioned": True,
        }
    config["uniap"] = {
        "target": plan.target,
        "pipeline_stages": plan.pipeline_degree,
        "data_parallel_size": plan.data_parallel_size,
        "zero": strategy.zero_label,
        "transformer_layers_per_stage": plan.stage_layer_counts(),
        "layer_stages": [lp.stage for lp in plan.layers],
        "activation_checkpointing": recompute,
        "predicted_time_per_iteration_s": round(plan.time_per_iteration, 6),
        "basis": plan.basis,
    }
    return config


def plan_for_deepspeed(
    model: str,
    cluster: str = "dgx-a100-80g",
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    global_batch_size: int = DEFAULT_BATCH,
    seq_length: int | None = None,
    zero_stage: int | None = None,
    pipeline_stages: int | None = None,
    offload: str | None = None,
    precision: str = DEFAULT_PRECISION,
    profile: str | None = None,
    time_limit: float | None = None,
    flash_attention: bool = True,
    decoder_seq_length: int | None = None,
) -> Plan:
    """Plan `model` on `cluster` for DeepSpeed; pinned ZeRO stage / pipeline stages / offload are constraints."""
    from uniap.profile.schema import Profile

    spec = load_model(model)
    training = training_spec(
        spec,
        global_batch_size,
        seq_length,
        precision=precision,
        flash_attention=flash_attention,
        decoder_seq_length=decoder_seq_length,
    )
    job = Job(
        model=spec,
        cluster=load_cluster(cluster, nodes, gpus_per_node),
        training=training,
        target=DEEPSPEED.name,
        pins=Pins(zero=zero_stage, pipeline_degree=pipeline_stages, offload=offload),
        profile=Profile.load(profile) if profile else None,
    )
    return solve(job, time_limit=time_limit, progress=False)[0]


def plan_config(
    model: str, base: dict[str, Any] | str | Path | None = None, hf: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """The DeepSpeed config for a training script: plans (see plan_for_deepspeed), translates, and merges
    into `base` (the user's config, a dict or a JSON file; uniap_deepspeed.merge), whose batch and
    precision are the job's unless given in `kwargs`. `hf`: for a Hugging Face Trainer (one pipeline stage,
    "auto" where the Trainer fills values; pass it merge.trainer_arguments(config))."""
    if base is not None and not isinstance(base, dict):
        base = read_base(base)
    for key, value in (base_job(base) if base else {}).items():
        kwargs.setdefault(key, value)
    if hf:
        kwargs["pipeline_stages"] = hf_pipeline_stages(kwargs.get("pipeline_stages"))
    plan = plan_for_deepspeed(model, **kwargs)
    config = merge_config(deepspeed_config(plan), base, hf=hf).config
    for note in ineffective_pins(plan, Pins(zero=kwargs.get("zero_stage"))) + plan.notes + variant_notes(config):
        log.warning("%s", note)
    return config


def vocabulary_notes(plan: Plan) -> list[str]:
    """A vocabulary DeepSpeed builds unaligned (the model's own size) and what padding it would save."""
    from uniap.cost.model import vocab_aligned

    vocab = plan.model.vocab_size
    if vocab_aligned(vocab, 1, DEEPSPEED.vocab_multiple, plan.training.bytes_per_value):
        return []
    padded = -(-vocab // PAD_VOCAB_TO) * PAD_VOCAB_TO
    fraction = plan.cluster.coefficients.misaligned_gemm
    return [
        f"the vocabulary of {vocab:,} tokens is not a multiple of 8, so the output projection's GEMMs run at "
        f"{fraction:g} of the usual efficiency (measured on an H200) and the plan is priced so; padding it to "
        f"{padded:,} (Hugging Face: model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of="
        f"{PAD_VOCAB_TO})) and planning with that size makes the head several times faster"
    ]


def precision_notes(config: dict[str, Any]) -> list[str]:
    """What the config's precision does to gradients that a user should know before training with it."""
    steps = config["gradient_accumulation_steps"]
    pipeline = config["uniap"]["pipeline_stages"] > 1
    if not pipeline or config.get("bf16", {}).get("enabled") is not True or steps == 1:
        return []
    if config.get(DATA_TYPES, {}).get(GRAD_ACCUM_DTYPE) == "fp32":
        return [
            f"the pipeline's gradients are added over {steps} micro-batches in fp32 (data_types.grad_accum_dtype; "
            "DeepSpeed's BF16_Optimizer): 2 bytes per parameter more than in bf16 and an fp32 all-reduce, both priced"
        ]
    return [
        f"the pipeline engine adds each stage's gradients over {steps} micro-batches in bf16 (DeepSpeed warns "
        "this is numerically unsafe over many steps); DeepSpeed 0.19.8 accumulates in fp32 only with ZeRO-1 and no "
        "offloading: with --zero-stage 1 --offload none uniap sets it and prices its cost (2 bytes per parameter "
        "more, twice the all-reduce's bytes)"
    ]


def variant_notes(config: dict[str, Any]) -> list[str]:
    """What running the config's ZeRO variant asks of the user (DeepSpeed 0.19.8 runtime/engine.py
    _configure_basic_optimizer, runtime/zero/partition_parameters.py)."""
    zero = config["zero_optimization"]
    notes = []
    if OFFLOAD_KEYS[OFFLOAD_OPTIMIZER] in zero:
        notes.append(
            "offloaded optimizer states are stepped by DeepSpeedCPUAdam, which DeepSpeed compiles on first use "
            "(minutes; a C++ compiler and ninja needed, or install DeepSpeed with DS_BUILD_CPU_ADAM=1); a script "
            "that passes its own torch optimizer to deepspeed.initialize is refused unless the config sets "
            '"zero_force_ds_cpu_optimizer": false, and then steps slower'
        )
    if zero.get(QUANTIZED_WEIGHTS):
        notes.append(
            "ZeRO++ all-gathers weights in int8 and reduces gradients in int4 (CUDA kernels only; the ZeRO++ paper "
            "reports pretraining converging as without): a change of numerics to watch in the first loss curves"
        )
    return notes


def hf_pipeline_stages(pinned: int | None) -> int:
    """The pipeline stages a Hugging Face Trainer job is planned with: one (the Trainer runs DeepSpeed's ZeRO
    engine, not its PipelineEngine); SpecError for another pin."""
    if pinned not in (None, 1):
        raise SpecError(
            f"--hf plans for Hugging Face's Trainer, which has no DeepSpeed pipeline engine, but "
            f"{pinned} pipeline stages are pinned",
            "drop --pipeline-stages, or train with a DeepSpeed script and PlannedPipelineModule",
        )
    return 1


def check_hf_plan(plan: Plan) -> None:
    """SpecError for a saved plan a Hugging Face Trainer cannot run (more than one pipeline stage)."""
    if plan.pipeline_degree > 1:
        raise SpecError(
            f"the plan has {plan.pipeline_degree} pipeline stages; Hugging Face's Trainer runs DeepSpeed's ZeRO "
            "engine, not its pipeline engine",
            "re-plan with --hf (one stage), or train with a DeepSpeed script and PlannedPipelineModule",
        )


def read_base(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed config file; SpecError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, "DeepSpeed config"))
    except json.JSONDecodeError as exc:
        raise SpecError(f"DeepSpeed config {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise SpecError(f"DeepSpeed config {path} nests its values too deeply") from None
    if not isinstance(data, dict):
        raise SpecError(f"DeepSpeed config {path} must hold a JSON object, not {type(data).__name__}")
    return data
