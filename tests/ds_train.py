"""Per-rank training program for the real DeepSpeed runs of tests/test_deepspeed.py.

Launched by `python -m torch.distributed.run --nproc-per-node N tests/ds_train.py ...` with
DS_ACCELERATOR=cpu; runs DeepSpeed's own engine on the gloo backend. The model is a tiny GPT written
in plain torch (vocab 64, hidden 32, 2 heads, ffn 128, 4 transformer layers, sequence 16) and it
overfits one fixed, seeded batch, so its loss must fall.

Two modes:
- plain: an nn.Module trained with `engine(x)`, `engine.backward(loss)`, `engine.step()` (any ZeRO stage);
- pipe:  a list of LayerSpecs wrapped in uniap's PlannedPipelineModule (the plan's split), trained
  with `engine.train_batch(data_iter)`.

Every rank writes `<out>/rank<r>.json` with its losses, what the engine runs (ZeRO stage, micro-batch,
accumulation steps) and, for pipe, the partition it holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS, FFN, LAYERS, SEQ = 64, 32, 2, 128, 4, 16


class EmbeddingPipe(nn.Module):
    """Token + learned position embedding: (batch, seq) token ids -> (batch, seq, hidden)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(SEQ, HIDDEN)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(positions)[None]


class TransformerLayerPipe(nn.Module):
    """Pre-LN causal self-attention + GELU MLP (a GPT block)."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.ln2 = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class HeadPipe(nn.Module):
    """Final LayerNorm + LM head: (batch, seq, hidden) -> (batch, seq, vocab) logits."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x):
        return self.out(self.ln(x))


def lm_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(EmbeddingPipe(), *[TransformerLayerPipe() for _ in range(LAYERS)], HeadPipe())

    def forward(self, ids, labels):
        return lm_loss(self.layers(ids), labels)


def dataset(global_batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch of random token sequences; labels are the inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def micro_batches(ids, labels, dp_rank: int, dp: int, micro: int, gas: int):
    """This data-parallel rank's `gas` micro-batches of `micro` samples of the global batch."""
    assert ids.shape[0] == micro * gas * dp, (ids.shape, micro, gas, dp)
    out = []
    for i in range(gas):
        start = (i * dp + dp_rank) * micro
        out.append((ids[start : start + micro], labels[start : start + micro]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="DeepSpeed JSON config (written by uniap)")
    ap.add_argument("--plan", help="uniap plan JSON (pipe mode)")
    ap.add_argument("--mode", choices=("auto", "plain", "pipe"), default="auto")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True, help="folder for rank<r>.json")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = ap.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on DeepSpeed's collectives
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    config = json.loads(Path(args.config).read_text())
    mode = args.mode
    if mode == "auto":
        mode = "pipe" if config.get("uniap", {}).get("pipeline_stages", 1) > 1 else "plain"
    ids, labels = dataset(config["train_batch_size"], args.seed)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    report: dict = {"rank": rank, "world_size": world, "mode": mode, "losses": []}

    if mode == "plain":
        model = TinyGPT()
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=args.config, optimizer=optimizer
        )
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        dp = engine.dp_world_size
        batches = micro_batches(ids, labels, deepspeed.comm.get_rank() % dp, dp, micro, gas)
        for _ in range(args.steps):
            total = 0.0
            for x, y in batches:
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                total += loss.detach().float()
            mean = total / gas
            deepspeed.comm.all_reduce(mean)  # the loss of the whole global batch, the same on every rank
            report["losses"].append(float(mean) / dp)
        # ZeRO-3 wraps every parameter (ds_id); ones below stage3_param_persistence_threshold stay whole
        params = list(engine.module.parameters())
        report.update(
            parameters=len(params),
            zero3_managed=sum(hasattr(p, "ds_id") for p in params),
            zero3_persistent=sum(bool(getattr(p, "ds_persist", False)) for p in params),
        )
    else:
        from deepspeed.pipe import LayerSpec

        from uniap.plan import Plan
        from uniap_deepspeed.pipeline import PlannedPipelineModule

        plan = Plan.load(args.plan)
        layers = [
            LayerSpec(EmbeddingPipe),
            *[LayerSpec(TransformerLayerPipe) for _ in range(LAYERS)],
            LayerSpec(HeadPipe),
        ]
        # partition_method as code written for PipelineModule passes it: the plan's split wins
        module = PlannedPipelineModule(layers, plan=plan, loss_fn=lm_loss, partition_method="parameters")
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=params, config=args.config, optimizer=optimizer
        )
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        dp = engine.grid.data_parallel_size
        batches = micro_batches(ids, labels, engine.grid.data_parallel_id, dp, micro, gas)
        data_iter = itertools.cycle(batches)
        for _ in range(args.steps):
            loss = engine.train_batch(data_iter=data_iter)
            report["losses"].append(float(loss))
        report.update(
            parts=list(module.parts),
            stage_id=engine.stage_id,
            num_stages=engine.num_stages,
            local_start=module._local_start,
            local_stop=module._local_stop,
            local_layers=[type(layer).__name__ for layer in module.forward_funcs],
            local_parameters=sum(p.numel() for p in params),
            dp=dp,
        )

    report.update(
        zero_stage=engine.zero_optimization_stage(),
        micro_batch_per_gpu=micro,
        gradient_accumulation_steps=gas,
        train_batch_size=engine.train_batch_size(),
        dp_world_size=engine.dp_world_size,
        optimizer=type(engine.optimizer).__name__,
        basic_optimizer=type(engine.basic_optimizer).__name__,
        # What the ZeRO optimizer runs, not only what the file says: states offloaded to the host.
        offload_optimizer=bool(getattr(engine.optimizer, "cpu_offload", False))
        or bool(getattr(engine.optimizer, "offload_optimizer", False)),
        offload_param=bool(getattr(engine.optimizer, "offload_param", False)),
    )
    report["finite"] = all(math.isfinite(v) for v in report["losses"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    deepspeed.comm.barrier()
    if rank == 0:
        print(f"ds_train: {mode} losses {[round(v, 4) for v in report['losses']]}", flush=True)
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
