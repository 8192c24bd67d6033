"""A plan's DeepSpeed config merged into the user's own (`--base ds_config.json`), or made complete without one.

uniap owns the keys a plan decides: the batch (train_batch_size, train_micro_batch_size_per_gpu,
gradient_accumulation_steps), parallelism and memory (zero_optimization, pipeline, activation_checkpointing
when the plan recomputes) and precision (bf16 / fp16). Everything else of the user's stays as it is: the
optimizer, the scheduler, gradient clipping, logging, checkpointing, communication settings, any key uniap
does not know. Each key uniap changes is reported with the reason. Without a base, the config gets an AdamW
optimizer, a warm-up scheduler and clipping 1.0, reported as defaults to review, so it runs as it is.

For Hugging Face's Trainer (and Accelerate) the defaults are "auto" instead: the Trainer fills the optimizer,
the scheduler and clipping from its own arguments (transformers integrations/deepspeed.py
HfTrainerDeepSpeedConfig.trainer_config_process). The plan's batch and precision stay numbers, which the
Trainer checks against its arguments and refuses on a mismatch; `trainer_arguments` are the ones to pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# The keys a plan decides (uniap_deepspeed/config.py writes them) and why, for the report.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
PRECISION_KEYS = ("bf16", "fp16")
OWNED_REASONS = {
    "train_batch_size": "the plan's global batch",
    "train_micro_batch_size_per_gpu": "the plan's micro-batch size per replica",
    "gradient_accumulation_steps": "the plan's micro-batches per iteration",
    "zero_optimization": "the plan's ZeRO stage and the buckets it was priced with",
    "pipeline": "the plan's pipeline",
    "activation_checkpointing": "the plan recomputes activations",
    "data_types": "the plan accumulates the pipeline's bf16 gradients in fp32",
    "bf16": "the plan's precision",
    "fp16": "the plan's precision",
    "uniap": "the plan's split and prediction, for the training script",
}
UNIAP_SECTION = "uniap"
DATA_TYPES, GRAD_ACCUM_DTYPE = "data_types", "grad_accum_dtype"
# A complete config needs these; without a base they are uniap's defaults, printed for review.
DEFAULT_TRAINING = {
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 1000},
    },
    "gradient_clipping": 1.0,
}


# The same for a Hugging Face Trainer: "auto", filled from its TrainingArguments (learning rate, Adam betas and
# epsilon, weight decay, warm-up and total steps, max_grad_norm).
HF_AUTO = "auto"
HF_TRAINING = {
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": HF_AUTO, "betas": HF_AUTO, "eps": HF_AUTO, "weight_decay": HF_AUTO},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": HF_AUTO,
            "warmup_max_lr": HF_AUTO,
            "warmup_num_steps": HF_AUTO,
            "total_num_steps": HF_AUTO,
        },
    },
    "gradient_clipping": HF_AUTO,
}
# TrainingArguments that must equal the config's keys (the Trainer's own spelling).
HF_MICRO_BATCH, HF_ACCUMULATION = "--per_device_train_batch_size", "--gradient_accumulation_steps"
HF_PRECISION_FLAGS = {"bf16": "--bf16", "fp16": "--fp16"}


@dataclass
class MergedConfig:
    """The config to write and what uniap did to the user's: (key, what changed and why) per change."""

    config: dict[str, Any]
    changes: list[tuple[str, str]] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)

    def report_lines(self) -> list[str]:
        lines = [f"  {key}: {why}" for key, why in self.changes]
        if self.defaults:
            lines.append(
                f"  defaults to review (no --base): {', '.join(self.defaults)} "
                "(a script that passes its own optimizer to deepspeed.initialize keeps it)"
            )
        return lines


def base_job(base: dict[str, Any]) -> dict[str, Any]:
    """What the user's config says about the job itself: the global batch and the precision (for planning
    when the command line does not say)."""
    job: dict[str, Any] = {}
    batch = base.get("train_batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        job["global_batch_size"] = batch
    for precision in PRECISION_KEYS:
        section = base.get(precision)
        if isinstance(section, dict) and section.get("enabled") is True:
            job["precision"] = precision
    return job


def merge_config(planned: dict[str, Any], base: dict[str, Any] | None, hf: bool = False) -> MergedConfig:
    """`planned` (deepspeed_config(plan)) merged into `base` as the module docstring says; `hf`: for a Hugging
    Face Trainer ("auto" defaults)."""
    if base is None:
        defaults = HF_TRAINING if hf else DEFAULT_TRAINING
        config = copy.deepcopy(defaults)
        config.update(copy.deepcopy(planned))
        return MergedConfig(config, defaults=[] if hf else list(defaults))
    config = copy.deepcopy(base)
    merged = MergedConfig(config)
    for key, value in planned.items():
        if key not in OWNED_REASONS:  # logging defaults of the plan's config: the user's wins
            config.setdefault(key, copy.deepcopy(value))
            continue
        if key in PRECISION_KEYS:
            continue  # below, together with the precision the plan does not use
        old = config.get(key)
        if old != value:
            config[key] = copy.deepcopy(value)
            if key != UNIAP_SECTION:
                merged.changes.append((key, _change(old, value, OWNED_REASONS[key])))
    _merge_precision(config, planned, merged)
    section = config.get(DATA_TYPES)
    if DATA_TYPES not in planned and isinstance(section, dict) and GRAD_ACCUM_DTYPE in section:
        # Priced in the model's dtype: another accumulation dtype changes the optimizer DeepSpeed runs and its memory.
        config[DATA_TYPES] = {k: v for k, v in section.items() if k != GRAD_ACCUM_DTYPE}
        merged.changes.append(
            (DATA_TYPES, f"dropped {GRAD_ACCUM_DTYPE} (the plan accumulates gradients in the model's dtype, as priced)")
        )
    return merged


def _merge_precision(config: dict[str, Any], planned: dict[str, Any], merged: MergedConfig) -> None:
    """The plan's precision enabled (the user's other settings in its section kept), the other one off."""
    for key in PRECISION_KEYS:
        section = config.get(key)
        wanted = planned.get(key)
        if wanted is not None:
            new = {**(section if isinstance(section, dict) else {}), **wanted}
            if new != section:
                config[key] = new
                merged.changes.append((key, _change(section, new, OWNED_REASONS[key])))
        elif isinstance(section, dict) and section.get("enabled"):
            config[key] = {**section, "enabled": False}
            merged.changes.append((key, f"enabled -> false ({OWNED_REASONS[key]} is another)"))


def _change(old: Any, new: Any, why: str) -> str:
    if old is None:
        return f"set ({why})"
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        parts = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if k in old and k in new]
        added = [k for k in changed if k not in old]
        dropped = [k for k in changed if k not in new]
        if added:
            parts.append(f"added {', '.join(added)}")
        if dropped:
            parts.append(f"dropped {', '.join(dropped)}")
        return f"{'; '.join(parts)} ({why})"
    return f"{old!r} -> {new!r} ({why})"


def trainer_arguments(config: dict[str, Any]) -> list[str]:
    """The Trainer's arguments that `config`'s batch and precision require (it refuses a mismatch)."""
    args = [
        HF_MICRO_BATCH,
        str(config["train_micro_batch_size_per_gpu"]),
        HF_ACCUMULATION,
        str(config["gradient_accumulation_steps"]),
    ]
    return args + [flag for key, flag in HF_PRECISION_FLAGS.items() if config.get(key, {}).get("enabled") is True]
