"""A ZeRO training script in the style of DeepSpeedExamples' HelloDeepSpeed (training/HelloDeepSpeed/
train_bert_ds.py): a RoBERTa masked-LM built from a Hugging Face config, `deepspeed.initialize(model=...,
model_parameters=model.parameters())` with no optimizer of its own (the config brings it), then
`loss = engine(**batch).loss; engine.backward(loss); engine.step()`.

Launched on CPU ranks by tests/test_deepspeed_examples.py; every rank writes `<out>/rank<r>.json`: its losses, the
ZeRO stage and optimizer the engine runs, and under ZeRO-3 each parameter's full and local element counts
(`ds_numel`, `ds_tensor.numel()`), which show whether DeepSpeed really partitioned it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import deepspeed
import torch
from transformers import RobertaConfig, RobertaForMaskedLM


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the RoBERTa's config.json folder")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = RobertaConfig.from_pretrained(args.model)
    config._attn_implementation = "eager"
    model = RobertaForMaskedLM(config)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    generator = torch.Generator().manual_seed(0)
    batch = engine.train_micro_batch_size_per_gpu()
    ids = torch.randint(4, config.vocab_size, (batch, args.seq_length), generator=generator)
    losses = []
    for _ in range(args.steps):
        step_losses = []
        for _ in range(engine.gradient_accumulation_steps()):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            step_losses.append(float(loss))
        losses.append(sum(step_losses) / len(step_losses))
    rank = torch.distributed.get_rank()
    report = {
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(engine.optimizer).__name__,
        "world_size": engine.world_size,
        "partitions": {
            name: [p.ds_numel, p.ds_tensor.numel()]
            for name, p in engine.module.named_parameters()
            if hasattr(p, "ds_tensor")
        },
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
