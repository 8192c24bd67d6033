"""A Hugging Face Trainer script as users write them, for the real run of tests/test_deepspeed_hf.py.

Launched by the launch.sh `uniap-deepspeed launch --config-arg hf` writes (DeepSpeed's launcher, CPU accelerator,
gloo): every argument is a TrainingArguments field (`--deepspeed PATH` among them). The model is a tiny GPT-2
built from `--model_dir`'s config.json (no download); the data one fixed, seeded batch repeated, so the loss
falls. Rank 0 writes `<output_dir>/report.json`: the losses and what the DeepSpeed engine the Trainer built
runs (micro-batch, accumulation steps, world size, ZeRO stage, the optimizer's learning rate).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments


@dataclass
class ModelArguments:
    model_dir: str = field(metadata={"help": "folder holding the model's config.json"})
    seq_length: int = 32


class FixedBatch(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (8, seq), generator=generator)

    def __len__(self) -> int:
        return 1024

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i % len(self.ids)]
        return {"input_ids": ids, "labels": ids}


class Losses(TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> int:
    model_args, args = HfArgumentParser((ModelArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(model_args.model_dir))
    losses = Losses()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=FixedBatch(model.config.vocab_size, model_args.seq_length),
        callbacks=[losses],
    )
    trainer.train()
    engine = trainer.model_wrapped
    if args.process_index == 0:
        report = {
            "losses": losses.losses,
            "finite": all(math.isfinite(x) for x in losses.losses),
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "accumulation": engine.gradient_accumulation_steps(),
            "world_size": engine.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "lr": engine.optimizer.param_groups[0]["lr"] if engine.optimizer else None,
            "learning_rate": args.learning_rate,
            "max_grad_norm": args.max_grad_norm,
            "gradient_clipping": engine.gradient_clipping(),
        }
        Path(args.output_dir, "report.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
