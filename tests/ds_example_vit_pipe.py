"""A pipeline training script in the style of DeepSpeedExamples' (training/pipeline_parallelism/train.py), with a
Vision Transformer built from a Hugging Face config as issue 12's user built it: transformers' own ViTEmbeddings
and ViTLayer as LayerSpecs, uniap's PlannedPipelineModule where the example has PipelineModule (the
`partition_method` argument kept from the example), the config from --deepspeed_config, engine.train_batch.

Launched on CPU ranks by tests/test_deepspeed_examples.py; every rank writes `<out>/rank<r>.json`: its losses,
its stage and the class names of the layers it holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import deepspeed
import torch
from deepspeed.pipe import LayerSpec
from torch import nn
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer

from uniap.plan import Plan
from uniap_deepspeed.pipeline import PlannedPipelineModule


class ViTClassifierHead(nn.Module):
    """Final norm and the classifier on the [CLS] token, as ViTForImageClassification has them."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states):
        return self.classifier(self.layernorm(hidden_states)[:, 0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the ViT's config.json folder")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = ViTConfig.from_pretrained(args.model)
    config._attn_implementation = "eager"
    layers = [
        LayerSpec(ViTEmbeddings, config),
        *[LayerSpec(ViTLayer, config) for _ in range(config.num_hidden_layers)],
        LayerSpec(ViTClassifierHead, config),
    ]
    model = PlannedPipelineModule(
        layers, Plan.load(args.plan), loss_fn=nn.CrossEntropyLoss(), partition_method="parameters"
    )
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad]
    )
    generator = torch.Generator().manual_seed(0)
    batch = engine.train_micro_batch_size_per_gpu()
    images = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    data = itertools.repeat((images, labels))
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(args.steps)]
    rank = torch.distributed.get_rank()
    report = {
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "stage": engine.stage_id,
        "layers": [type(m).__name__ for m in model.forward_funcs],
        "parts": model.parts,
        "micro_batches": engine.micro_batches,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
