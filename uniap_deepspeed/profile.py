"""`uniap-deepspeed profile`: measure layer times, the optimizer step and collective bandwidths through
DeepSpeed's runtime, and calibrate them against a whole-model training run.

Layers: for every distinct layer signature of the model's graph (the profile key, see
uniap.model.graph), a faithful torch module of that layer is built from the ModelSpec (pre-norm
attention with grouped K/V heads, causal for a decoder, RoPE, MLP or SwiGLU, LayerNorm or RMSNorm,
optional biases, dropout 0), wrapped with `deepspeed.initialize` (ZeRO stage 0, bf16/fp16 on a GPU,
fp32 on the CPU) and timed as engine forward + `engine.backward` for each micro-batch size: the
median of `repeats` iterations after `warmup`. Embedding and head layers are timed too, so a plan
built from the profile can say `compute measured`. DeepSpeed has no tensor parallelism of its own,
so every timing is at tp=1.

Collectives (world size >= 2): all_reduce, all_gather, reduce_scatter and all_to_all over the whole
world through `deepspeed.comm`, plus P2P send/recv (ping-pong between rank 0 and rank 1, and with
the first rank of the next node when there is one); bus bandwidth in the NCCL-tests convention, the
best over the message sizes. On several nodes the collectives are also measured inside each node.

Optimizer: one `engine.step()` over the parameters of a transformer layer (the layer module itself),
ZeRO 0, the layers' precision, an AdamW optimizer section (DeepSpeed's FusedAdam on a GPU,
torch.optim.AdamW via `torch_adam` on the CPU or where FusedAdam does not build): the median step
after a warm-up step, and on CUDA the memory the step allocates beyond what was allocated before it.

Calibration (--calibration-layers N, default 2): a whole model of the real dimensions with N
transformer layers trained through DeepSpeed with the config uniap emits for it, every rank a
data-parallel replica; its time per iteration (and peak memory on CUDA) fitted into the profile's
Calibration (see uniap_deepspeed.training_run).

Run it single-process (`python -m uniap_deepspeed.profile ...`) or under torchrun / the deepspeed
launcher; rank 0 writes the profile JSON atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from uniap.errors import EXIT_OK, ProfileError, SpecError
from uniap.model.graph import (CROSS_TRANSFORMER, EMBEDDING, HEAD, TRANSFORMER, TRANSFORMER_KINDS, Layer,
                               build_graph)
from uniap.model.loaders import load_model
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.planner import training_spec
from uniap.profile.options import float_list, int_list
from uniap.profile.runner import (
    check_common_args,
    default_single_process_env,
    print_summary,
    processor_name,
    run_profiler_cli,
)
from uniap.profile.schema import (
    CollectiveBandwidth,
    LayerTiming,
    OptimizerTiming,
    Profile,
    bus_factor,
)

log = logging.getLogger("uniap.deepspeed.profile")

# Set by torchrun / the deepspeed launcher, or by MPI launchers DeepSpeed can discover.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
CPU_NOTE = "CPU timings: for testing the pipeline, not for planning GPU jobs"
DEFAULT_SIZES_MB_CPU = (1.0, 4.0)
DEFAULT_SIZES_MB_GPU = (16.0, 64.0, 256.0)
WORLD_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# Timed optimizer steps and calibration iterations at least: both are short, and a median of two is a mean.
OPTIMIZER_MIN_STEPS = 5
CALIBRATION_MIN_ITERATIONS = 3
# The AdamW the optimizer timing and the calibration run step with (a typical pretraining setting).
ADAMW_PARAMS: dict[str, Any] = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


# ==================================================================================================
# Layer modules (built lazily: torch is imported only when profiling)
# ==================================================================================================

def _layer_modules():
    """The torch module classes, defined on first use so that importing this file needs no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def norm(m: ModelSpec) -> nn.Module:
        if m.normalization == "rmsnorm":
            return nn.RMSNorm(m.hidden_size, eps=1e-5)
        return nn.LayerNorm(m.hidden_size, eps=1e-5)

    def rope_tables(s: int, d: int, device, dtype):
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def apply_rope(x, cos, sin):  # x: (b, heads, s, d)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Attention(nn.Module):
        """Pre-norm attention block (its norm included), output projection; no residual add.
        Self-attention uses one fused QKV projection (as megatron-core does); cross-attention a Q
        projection of the input and a KV projection of the encoder output."""

        def __init__(self, m: ModelSpec, causal: bool, cross: bool, flash: bool):
            super().__init__()
            self.heads, self.groups, self.d = m.num_attention_heads, m.query_groups, m.head_dim
            h, q, kv = m.hidden_size, self.heads * self.d, self.groups * self.d
            self.causal, self.cross, self.flash = causal, cross, flash
            self.rope = m.position_embedding == "rope" and not cross and self.d % 2 == 0
            self.norm = norm(m)
            if cross:
                self.linear_q = nn.Linear(h, q, bias=m.add_bias)
                self.linear_kv = nn.Linear(h, 2 * kv, bias=m.add_bias)
            else:
                self.linear_qkv = nn.Linear(h, q + 2 * kv, bias=m.add_bias)
            self.linear_proj = nn.Linear(q, h, bias=m.add_bias)

        def forward(self, x, memory=None):
            b, s, _ = x.shape
            y = self.norm(x)
            q_width, kv_width = self.heads * self.d, self.groups * self.d
            if self.cross:
                q = self.linear_q(y)
                k, v = self.linear_kv(memory).split([kv_width, kv_width], dim=-1)
            else:
                q, k, v = self.linear_qkv(y).split([q_width, kv_width, kv_width], dim=-1)
            s_kv = k.shape[1]
            q = q.view(b, s, self.heads, self.d).transpose(1, 2)
            k = k.view(b, s_kv, self.groups, self.d).transpose(1, 2)
            v = v.view(b, s_kv, self.groups, self.d).transpose(1, 2)
            if self.rope:
                cos, sin = rope_tables(s, self.d, x.device, x.dtype)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.groups != self.heads:  # grouped-query attention: each K/V head serves heads/groups Q heads
                k = k.repeat_interleave(self.heads // self.groups, dim=1)
                v = v.repeat_interleave(self.heads // self.groups, dim=1)
            if self.flash:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            else:  # the unfused kernel: materializes the s x s scores (what --no-flash-attention plans for)
                scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d)
                if self.causal:
                    mask = torch.ones(s, s_kv, dtype=torch.bool, device=x.device).triu(1)
                    scores = scores.masked_fill(mask, float("-inf"))
                o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
            return self.linear_proj(o.transpose(1, 2).reshape(b, s, q_width))

    class MLP(nn.Module):
        """Pre-norm MLP: GeLU, or SwiGLU when gated (fc1 produces gate and up halves)."""

        def __init__(self, m: ModelSpec):
            super().__init__()
            self.gated = m.gated_mlp
            self.norm = norm(m)
            self.linear_fc1 = nn.Linear(m.hidden_size, m.ffn_hidden_size * (2 if m.gated_mlp else 1), bias=m.add_bias)
            self.linear_fc2 = nn.Linear(m.ffn_hidden_size, m.hidden_size, bias=m.add_bias)

        def forward(self, x):
            u = self.linear_fc1(self.norm(x))
            if self.gated:
                gate, up = u.chunk(2, dim=-1)
                u = F.silu(gate) * up
            else:
                u = F.gelu(u)
            return self.linear_fc2(u)

    class TransformerLayer(nn.Module):
        def __init__(self, m: ModelSpec, s: int, causal: bool, flash: bool):
            super().__init__()
            self.s, self.h = s, m.hidden_size
            self.self_attention = Attention(m, causal=causal, cross=False, flash=flash)
            self.mlp = MLP(m)

        def forward(self, x):
            x = x + self.self_attention(x)
            return x + self.mlp(x)

        def example_inputs(self, b, device, dtype):
            return (torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),)

    class CrossTransformerLayer(nn.Module):
        """An encoder-decoder decoder layer: causal self-attention, cross-attention, MLP."""

        def __init__(self, m: ModelSpec, s: int, s_enc: int, flash: bool):
            super().__init__()
            self.s, self.s_enc, self.h = s, s_enc, m.hidden_size
            self.self_attention = Attention(m, causal=True, cross=False, flash=flash)
            self.cross_attention = Attention(m, causal=False, cross=True, flash=flash)
            self.mlp = MLP(m)

        def forward(self, x, memory):
            x = x + self.self_attention(x)
            x = x + self.cross_attention(x, memory)
            return x + self.mlp(x)

        def example_inputs(self, b, device, dtype):
            return (torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
                    torch.randn(b, self.s_enc, self.h, device=device, dtype=dtype, requires_grad=True))

    class Embedding(nn.Module):
        """Word embedding (+ learned positions, + token types for an encoder)."""

        def __init__(self, m: ModelSpec, s: int):
            super().__init__()
            self.s, self.vocab = s, m.vocab_size
            self.word_embeddings = nn.Embedding(m.vocab_size, m.hidden_size)
            self.position_embeddings = (nn.Embedding(m.max_position_embeddings, m.hidden_size)
                                        if m.position_embedding == "learned" else None)
            self.tokentype_embeddings = nn.Embedding(2, m.hidden_size) if m.architecture == "encoder" else None

        def forward(self, ids):
            out = self.word_embeddings(ids)
            if self.position_embeddings is not None:
                out = out + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device))
            if self.tokentype_embeddings is not None:
                out = out + self.tokentype_embeddings(torch.zeros_like(ids))
            return out

        def example_inputs(self, b, device, dtype):
            return (torch.randint(0, self.vocab, (b, self.s), device=device),)

    class PatchEmbedding(nn.Module):
        """ViT: patches -> hidden (a strided convolution), class token, learned positions."""

        def __init__(self, m: ModelSpec):
            super().__init__()
            self.m = m
            self.proj = nn.Conv2d(m.num_channels, m.hidden_size, kernel_size=m.patch_size, stride=m.patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, m.hidden_size))
            self.position_embeddings = nn.Parameter(torch.zeros(1, m.vit_seq_length, m.hidden_size))

        def forward(self, images):
            x = self.proj(images).flatten(2).transpose(1, 2)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            return x + self.position_embeddings

        def example_inputs(self, b, device, dtype):
            m = self.m
            return (torch.randn(b, m.num_channels, m.image_size, m.image_size, device=device, dtype=dtype),)

    class LMHead(nn.Module):
        """Final norm, output projection, cross-entropy on fp32 logits; returns the loss."""

        def __init__(self, m: ModelSpec, s: int):
            super().__init__()
            self.s, self.h, self.vocab = s, m.hidden_size, m.vocab_size
            self.final_norm = norm(m)
            self.output_layer = nn.Linear(m.hidden_size, m.vocab_size, bias=False)

        def forward(self, x, labels):
            logits = self.output_layer(self.final_norm(x)).float()
            return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))

        def example_inputs(self, b, device, dtype):
            return (torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
                    torch.randint(0, self.vocab, (b, self.s), device=device))

    class MLMHead(nn.Module):
        """BERT: pooler on the first token, masked-LM transform (dense, GeLU, norm), output projection."""

        def __init__(self, m: ModelSpec, s: int):
            super().__init__()
            self.s, self.h, self.vocab = s, m.hidden_size, m.vocab_size
            self.pooler = nn.Linear(m.hidden_size, m.hidden_size)
            self.dense = nn.Linear(m.hidden_size, m.hidden_size)
            self.norm = norm(m)
            self.output_layer = nn.Linear(m.hidden_size, m.vocab_size, bias=False)  # as the graph counts it

        def forward(self, x, labels):
            pooled = torch.tanh(self.pooler(x[:, 0]))
            logits = self.output_layer(self.norm(F.gelu(self.dense(x)))).float()
            return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1)) + pooled.float().mean()

        def example_inputs(self, b, device, dtype):
            return (torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
                    torch.randint(0, self.vocab, (b, self.s), device=device))

    class ClsHead(nn.Module):
        """ViT: final norm, classifier on the class token, cross-entropy."""

        def __init__(self, m: ModelSpec, s: int):
            super().__init__()
            self.s, self.h, self.classes = s, m.hidden_size, m.num_classes
            self.final_norm = norm(m)
            self.classifier = nn.Linear(m.hidden_size, m.num_classes)

        def forward(self, x, labels):
            logits = self.classifier(self.final_norm(x)[:, 0]).float()
            return F.cross_entropy(logits, labels)

        def example_inputs(self, b, device, dtype):
            return (torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
                    torch.randint(0, self.classes, (b,), device=device))

    return {"TransformerLayer": TransformerLayer, "CrossTransformerLayer": CrossTransformerLayer,
            "Embedding": Embedding, "PatchEmbedding": PatchEmbedding, "LMHead": LMHead, "MLMHead": MLMHead,
            "ClsHead": ClsHead}


def build_layer_module(model: ModelSpec, training: TrainingSpec, layer: Layer):
    """A torch module computing `layer` of the graph (one instance, dropout 0) with `example_inputs(b,
    device, dtype)`; None for a layer kind this profiler does not know."""
    mods = _layer_modules()
    flash = training.flash_attention
    s = training.seq_length
    s_dec = training.decoder_seq_length or s
    arch = model.architecture
    if arch == "vit":
        s = model.vit_seq_length
    base = layer.name.split(".")[0]
    if layer.kind == TRANSFORMER:
        return mods["TransformerLayer"](model, s, causal=arch == "decoder", flash=flash)
    if layer.kind == CROSS_TRANSFORMER:
        return mods["CrossTransformerLayer"](model, s_dec, s, flash=flash)
    if layer.kind == EMBEDDING:
        if base == "patch_embedding":
            return mods["PatchEmbedding"](model)
        return mods["Embedding"](model, s_dec if base == "decoder_embedding" else s)
    if layer.kind == HEAD:
        if base == "lm_head":
            return mods["LMHead"](model, s_dec if arch == "encoder_decoder" else s)
        if base == "mlm_head":
            return mods["MLMHead"](model, s)
        if base == "cls_head":
            return mods["ClsHead"](model, s)
    return None


# ==================================================================================================
# Runtime helpers
# ==================================================================================================

@dataclass(frozen=True)
class _Runtime:
    device_kind: str  # 'cuda', 'cpu', ...
    device: str  # torch device string of this rank
    dtype: Any  # compute dtype of layers and collectives
    ds_precision: str  # 'bf16', 'fp16' or 'fp32': the DeepSpeed config's precision section
    rank: int
    world_size: int


def _accelerator():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def _quiet_deepspeed(verbose: bool) -> None:
    with contextlib.suppress(ImportError, AttributeError):  # pragma: no cover - logging only
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)


def init_distributed() -> tuple[int, int, str]:
    """deepspeed.init_distributed with the accelerator's backend (gloo on the CPU accelerator unless
    oneCCL is installed); (rank, world size, backend)."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    acc = _accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return dist.get_rank(), dist.get_world_size(), str(tdist.get_backend())


def _runtime(precision: str) -> _Runtime:
    import deepspeed.comm as dist
    import torch

    acc = _accelerator()
    kind = acc.device_name()
    device = acc.current_device_name() if kind != "cpu" else "cpu"
    ds_precision = "fp32"
    if kind != "cpu":
        if precision == "bf16" and acc.is_bf16_supported():
            ds_precision = "bf16"
        elif precision in ("bf16", "fp16") and acc.is_fp16_supported():
            ds_precision = "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ds_precision]
    return _Runtime(kind, device, dtype, ds_precision, dist.get_rank(), dist.get_world_size())


def device_description() -> str:
    """The GPU's name, or 'cpu (<processor>)'."""
    acc = _accelerator()
    if acc.device_name() == "cuda":
        import torch
        return torch.cuda.get_device_name(torch.cuda.current_device())
    if acc.device_name() != "cpu":
        return acc.device_name()
    return f"cpu ({processor_name()})"


def _ds_config(rt: _Runtime, micro_batch_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        # engine.backward needs an optimizer; plain SGD adds no state and is never stepped here.
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if rt.ds_precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif rt.ds_precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


class _Timer:
    """Forward/backward durations in ms: CUDA events on CUDA, perf_counter (after synchronize) otherwise."""

    def __init__(self, rt: _Runtime):
        self.cuda = rt.device_kind == "cuda"
        self.acc = _accelerator()

    def mark(self):
        if self.cuda:
            import torch
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        self.acc.synchronize()
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3


def _scalar(out):
    return out if out.dim() == 0 else out.mean()


def time_layer(module, rt: _Runtime, micro_batch_size: int, warmup: int, repeats: int) -> LayerTiming:
    """Wrap `module` in a DeepSpeed engine and time engine forward + engine.backward: medians over
    `repeats` iterations after `warmup`. Gradient reduction across ranks is off (engine.no_sync),
    so the times are compute only; DP communication is costed from the collective bandwidths."""
    import deepspeed

    acc = _accelerator()
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                           config=_ds_config(rt, micro_batch_size))
    try:
        inputs = module.example_inputs(micro_batch_size, rt.device, rt.dtype)
        timer = _Timer(rt)
        forward, backward, kept = [], [], []
        with engine.no_sync():
            for i in range(warmup + repeats):
                for x in inputs:
                    x.grad = None
                acc.synchronize()
                before = acc.memory_allocated() if rt.device_kind == "cuda" else 0
                t0 = timer.mark()
                loss = _scalar(engine(*inputs))
                t1 = timer.mark()
                after = acc.memory_allocated() if rt.device_kind == "cuda" else 0
                engine.backward(loss)
                t2 = timer.mark()
                acc.synchronize()
                if i >= warmup:
                    forward.append(timer.elapsed_ms(t0, t1))
                    backward.append(timer.elapsed_ms(t1, t2))
                    kept.append(after - before)
                del loss
        activation = float(statistics.median(kept)) if rt.device_kind == "cuda" else None
        return LayerTiming(tp=1, micro_batch_size=micro_batch_size, forward_ms=statistics.median(forward),
                           backward_ms=statistics.median(backward), activation_bytes=activation)
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        acc.empty_cache()


def _all_ranks_ok(ok: bool, rt: _Runtime) -> bool:
    if rt.world_size == 1:
        return ok
    import deepspeed.comm as dist
    import torch
    flag = torch.tensor([1.0 if ok else 0.0], device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


# ==================================================================================================
# Layers
# ==================================================================================================

def profile_layers(model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], warmup: int,
                   repeats: int) -> dict[str, list[LayerTiming]]:
    """Timings per layer signature (every rank times; rank 0's numbers are returned). A micro-batch
    size that runs out of memory on any rank is skipped with the larger ones for that layer."""
    import torch

    rt = _runtime(training.precision)
    graph = build_graph(model, training)
    first: dict[str, Layer] = {}
    for layer in graph.layers:
        first.setdefault(layer.signature, layer)
    out: dict[str, list[LayerTiming]] = {}
    for signature, layer in first.items():
        timings = []
        for mbs in sorted(set(micro_batch_sizes)):
            torch.manual_seed(1234)
            device_ctx = torch.device(rt.device) if rt.device_kind != "cpu" else torch.device("cpu")
            with device_ctx:
                module = build_layer_module(model, training, layer)
            if module is None:
                log.warning("no module for layer kind '%s' (%s); it stays estimated", layer.kind, signature)
                break
            timing, ok = None, True
            try:
                timing = time_layer(module, rt, mbs, warmup, repeats)
            except torch.OutOfMemoryError:
                ok = False
            del module
            if not _all_ranks_ok(ok, rt):
                log.warning("%s: micro-batch size %d ran out of memory; larger ones skipped", signature, mbs)
                gc.collect()
                _accelerator().empty_cache()
                break
            timings.append(timing)
            if rt.rank == 0:
                log.info("%-60s mbs %3d  fwd %9.3f ms  bwd %9.3f ms", signature, mbs, timing.forward_ms,
                         timing.backward_ms)
        if timings:
            out[signature] = timings
    return out


# ==================================================================================================
# Optimizer step
# ==================================================================================================

@cache
def _fused_adam_problem(device_kind: str) -> str | None:
    """Why DeepSpeed's FusedAdam cannot step here (None when it can). On a GPU, FusedAdam is what an
    `"optimizer": {"type": "AdamW"}` section builds (DeepSpeed 0.19.8 deepspeed/runtime/engine.py
    get_optimizer_configuration); its op is prebuilt or JIT-compiled by FusedAdamBuilder().load(). On the CPU
    accelerator that op is a C++ build of its own (deepspeed/ops/op_builder/cpu/fused_adam.py), so the CPU
    path steps with torch.optim.AdamW (`torch_adam`) instead of paying for a compiler run."""
    if device_kind == "cpu":
        return "the CPU accelerator steps with torch.optim.AdamW (torch_adam)"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder
        FusedAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - a missing compiler or CUDA toolkit: whatever the build raises
        first = (str(exc).splitlines() or [""])[0]
        return f"DeepSpeed FusedAdam unavailable ({type(exc).__name__}: {first})"
    return None


def use_torch_adam(rt: _Runtime) -> bool:
    """Whether the AdamW section needs `torch_adam` (FusedAdam does not load on some rank); all ranks agree."""
    problem = _fused_adam_problem(rt.device_kind)
    ok = _all_ranks_ok(problem is None, rt)
    if not ok and rt.device_kind != "cpu" and rt.rank == 0:
        log.warning("%s; stepping with torch.optim.AdamW", problem or "FusedAdam failed on another rank")
    return not ok


def optimizer_section(torch_adam: bool) -> dict[str, Any]:
    """The DeepSpeed config's optimizer section uniap's measurements step with: AdamW with ADAMW_PARAMS,
    DeepSpeed's FusedAdam, or torch.optim.AdamW when `torch_adam` (DeepSpeed 0.19.8
    deepspeed/runtime/engine.py _configure_basic_optimizer)."""
    params = dict(ADAMW_PARAMS)
    if torch_adam:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def optimizer_name(engine) -> str:
    """What engine.step() runs: the basic optimizer and the precision wrapper DeepSpeed put around it."""
    import torch

    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    cls = type(basic)
    if cls.__name__ == "FusedAdam" and cls.__module__.startswith("deepspeed"):
        name = "DeepSpeed FusedAdam"
    elif isinstance(basic, torch.optim.Optimizer) and cls.__module__.startswith("torch.optim"):
        foreach = basic.defaults.get("foreach")
        if foreach is None:  # torch's default: foreach when every tensor is on a CUDA device
            foreach = all(p.is_cuda for group in basic.param_groups for p in group["params"])
        name = f"torch.optim.{cls.__name__} ({'foreach' if foreach else 'for-loop'})"
    else:
        name = f"{cls.__module__}.{cls.__name__}"
    if engine.optimizer is not basic:
        name += f" in DeepSpeed {type(engine.optimizer).__name__}"
    return name


def time_optimizer_step(module, rt: _Runtime, micro_batch_size: int, warmup: int, repeats: int,
                        torch_adam: bool) -> OptimizerTiming:
    """One engine.step() over `module`'s parameters as DeepSpeed runs it (ZeRO 0, the runtime's precision,
    the AdamW of optimizer_section): after a forward/backward that leaves gradients, the median step time of
    `repeats` steps after max(warmup, 1) (the first step creates the Adam moments). On CUDA also the most
    allocated during a step beyond what was allocated before it. A step the fp16 loss scaler skips (an
    overflow) is not kept."""
    import deepspeed

    acc = _accelerator()
    config = _ds_config(rt, micro_batch_size)
    config["optimizer"] = optimizer_section(torch_adam)
    if rt.ds_precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 1.0}  # static: no overflow-skipped steps to time
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    try:
        inputs = module.example_inputs(micro_batch_size, rt.device, rt.dtype)
        timer, cuda = _Timer(rt), rt.device_kind == "cuda"
        times, extras = [], []
        for i in range(max(warmup, 1) + repeats):
            for x in inputs:
                x.grad = None
            loss = _scalar(engine(*inputs))
            engine.backward(loss)
            del loss
            acc.synchronize()
            before = 0
            if cuda:
                acc.reset_peak_memory_stats()
                before = acc.memory_allocated()
            skipped = engine.skipped_steps
            t0 = timer.mark()
            engine.step()
            t1 = timer.mark()
            acc.synchronize()
            if i >= max(warmup, 1) and engine.skipped_steps == skipped:
                times.append(timer.elapsed_ms(t0, t1))
                if cuda:
                    extras.append(acc.max_memory_allocated() - before)
        if not times:
            raise RuntimeError("every timed optimizer step was skipped by the loss scaler")
        num_params = sum(p.numel() for p in module.parameters())
        return OptimizerTiming(implementation=optimizer_name(engine), num_params=num_params,
                               step_ms=statistics.median(times),
                               extra_peak_bytes=float(max(0, max(extras))) if extras else None)
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        acc.empty_cache()


def profile_optimizer(model: ModelSpec, training: TrainingSpec, micro_batch_size: int, warmup: int,
                      repeats: int) -> OptimizerTiming | None:
    """The optimizer step over the parameters of the model's first transformer layer (the layer module
    itself), through a DeepSpeed engine; None (with a warning) when it runs out of memory on any rank."""
    import torch

    rt = _runtime(training.precision)
    graph = build_graph(model, training)
    layer = next((x for x in graph.layers if x.kind in TRANSFORMER_KINDS), None)
    if layer is None:  # pragma: no cover - every architecture has transformer layers
        return None
    torch_adam = use_torch_adam(rt)
    torch.manual_seed(1234)
    with torch.device(rt.device):
        module = build_layer_module(model, training, layer)
    timing, ok = None, True
    try:
        timing = time_optimizer_step(module, rt, micro_batch_size, warmup, repeats, torch_adam)
    except torch.OutOfMemoryError:
        ok = False
    del module
    if not _all_ranks_ok(ok, rt):
        log.warning("the optimizer step over %s ran out of memory; it stays estimated", layer.signature)
        gc.collect()
        _accelerator().empty_cache()
        return None
    if rt.rank == 0:
        log.info("optimizer %s: %.3f ms per step over %d parameters", timing.implementation, timing.step_ms,
                 timing.num_params)
    return timing


def profile_model(model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], warmup: int,
                  repeats: int, device_name: str | None = None, optimizer: bool = True) -> Profile:
    """Measure every layer signature of `model` through DeepSpeed, and (`optimizer`) one optimizer step
    over a transformer layer's parameters. Initializes deepspeed.comm if nothing did (a 1-process
    gloo/nccl group without a launcher). Every rank must call it; rank 0's numbers are returned. Add
    collectives with profile_collectives and a calibration with uniap_deepspeed.training_run.calibrate."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    if not micro_batch_sizes or any(not isinstance(b, int) or b < 1 for b in micro_batch_sizes):
        raise SpecError(f"micro-batch sizes must be positive integers (got {micro_batch_sizes!r})")
    if warmup < 0 or repeats < 1:
        raise SpecError(f"warmup must be >= 0 and repeats >= 1 (got warmup={warmup}, repeats={repeats})")
    if not dist.is_initialized():
        default_single_process_env(LAUNCHER_VARS)
        init_distributed()
    rt = _runtime(training.precision)
    layers = profile_layers(model, training, micro_batch_sizes, warmup, repeats)
    steps = max(repeats, OPTIMIZER_MIN_STEPS)
    timing = profile_optimizer(model, training, min(micro_batch_sizes), warmup, steps) if optimizer else None
    notes = [(f"DeepSpeed engine (ZeRO 0, {rt.ds_precision} compute), tp=1; median forward/backward ms of "
              f"{repeats} iterations after {warmup} warmup")]
    if rt.device_kind == "cuda":
        notes.append("activation_bytes = allocator bytes held from before forward to after it (kept for backward)")
    if timing is not None:
        notes.append(f"optimizer: engine.step() of {timing.implementation} over one transformer layer's "
                     f"parameters, median of {steps} steps after {max(warmup, 1)} warmup")
    if rt.device_kind == "cpu":
        notes.insert(0, CPU_NOTE)
    if rt.ds_precision != training.precision:
        notes.append(f"signatures say {training.precision}; computed in {rt.ds_precision} on {rt.device_kind}")
    if model.position_embedding == "relative":
        notes.append("T5 relative position bias not modelled in attention")
    return Profile(device=device_name or device_description(), runtime=f"deepspeed {deepspeed.__version__}",
                   layers=layers, backend=str(tdist.get_backend()), notes="; ".join(notes), optimizer=timing)


# ==================================================================================================
# Collectives
# ==================================================================================================

def _node_layout(world: int) -> list[list[int]]:
    """Ranks per node: contiguous blocks of LOCAL_WORLD_SIZE (torchrun) / LOCAL_SIZE (deepspeed
    launcher), else grouped by host name."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(key)
        if value and value.isdigit() and int(value) > 0 and world % int(value) == 0:
            local = int(value)
            return [list(range(start, start + local)) for start in range(0, world, local)]
    import deepspeed.comm as dist
    names: list[Any] = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    nodes: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        nodes.setdefault(name, []).append(rank)
    return list(nodes.values())


def _max_over_ranks(seconds: float, rt: _Runtime) -> float:
    import deepspeed.comm as dist
    import torch
    t = torch.tensor([seconds], dtype=torch.float64 if rt.device_kind == "cpu" else torch.float32,
                     device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _collective_call(op: str, nbytes: int, n: int, group, rt: _Runtime) -> Callable[[], None]:
    """A closure running `op` on a tensor of `nbytes` (the full tensor: all_reduce's buffer,
    all_gather's output, reduce_scatter's input, all_to_all's per-rank buffer)."""
    import deepspeed.comm as dist
    import torch

    elem = torch.tensor([], dtype=rt.dtype).element_size()
    numel = max(n, nbytes // elem // n * n)
    full = torch.ones(numel, dtype=rt.dtype, device=rt.device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full, group=group)
    shard = torch.ones(numel // n, dtype=rt.dtype, device=rt.device)
    if op == "all_gather":
        if dist.has_all_gather_into_tensor():
            return lambda: dist.all_gather_into_tensor(full, shard, group=group)
        parts = list(full.chunk(n))
        return lambda: dist.all_gather(parts, shard, group=group)
    if op == "reduce_scatter":
        if dist.has_reduce_scatter_tensor():
            return lambda: dist.reduce_scatter_tensor(shard, full, group=group)
        parts = list(full.chunk(n))
        return lambda: dist.reduce_scatter(shard, parts, group=group)
    raise ValueError(op)


def _measure(call: Callable[[], None], warmup: int, repeats: int, rt: _Runtime, group=None) -> float:
    import deepspeed.comm as dist
    acc = _accelerator()
    for _ in range(warmup):
        call()
    acc.synchronize()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    acc.synchronize()
    return (time.perf_counter() - t0) / repeats


def _supported(op: str, n: int, group, rt: _Runtime) -> bool:
    """Whether the backend runs `op` (probed on a tiny tensor; all ranks agree)."""
    ok = True
    try:
        _collective_call(op, 64 * n, n, group, rt)()
        _accelerator().synchronize()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        log.warning("%s is not supported by this backend (%s); not measured", op, str(exc).splitlines()[0])
        ok = False
    return _all_ranks_ok(ok, rt)


def _group_collectives(ranks_per_group: list[list[int]], scope: str, sizes: list[int], warmup: int, repeats: int,
                       rt: _Runtime, report: list[str]) -> list[CollectiveBandwidth]:
    """Every op over groups of equal size running concurrently (one group: the world)."""
    import deepspeed.comm as dist

    n = len(ranks_per_group[0])
    if len(ranks_per_group) == 1:
        group = None
    else:
        group = None
        for ranks in ranks_per_group:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if rt.rank in ranks:
                group = g
    out = []
    for op in WORLD_OPS:
        if not _supported(op, n, group, rt):
            continue
        best = 0.0
        for nbytes in sizes:
            seconds = _max_over_ranks(_measure(_collective_call(op, nbytes, n, group, rt), warmup, repeats, rt,
                                               group), rt)
            busbw = nbytes / seconds * bus_factor(op, n) / 1e9
            report.append(f"{op:15s} {scope:10s} n={n:<4d} {nbytes / 2**20:9.2f} MiB {seconds * 1e3:10.3f} ms "
                          f"busbw {busbw:9.3f} GB/s")
            best = max(best, busbw)
        if best > 0 and math.isfinite(best):
            out.append(CollectiveBandwidth(op=op, group_size=n, scope=scope, bus_bandwidth_gbps=best))
    return out


def _p2p(peer: int, scope: str, sizes: list[int], warmup: int, repeats: int, rt: _Runtime,
         report: list[str]) -> list[CollectiveBandwidth]:
    """Ping-pong between rank 0 and `peer`: one-way time = round trip / 2; bandwidth = size / time.
    Other ranks wait at the final agreement all-reduce."""
    import deepspeed.comm as dist
    import torch

    acc = _accelerator()
    best = 0.0
    for nbytes in sizes:
        seconds = 0.0
        if rt.rank in (0, peer):
            buf = torch.ones(max(1, nbytes // torch.tensor([], dtype=rt.dtype).element_size()), dtype=rt.dtype,
                             device=rt.device)

            def round_trip(buf=buf):
                if rt.rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)

            for _ in range(warmup):
                round_trip()
            acc.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                round_trip()
            acc.synchronize()
            seconds = (time.perf_counter() - t0) / repeats / 2
        seconds = _max_over_ranks(seconds, rt)
        busbw = nbytes / seconds / 1e9
        report.append(f"{'p2p':15s} {scope:10s} 0<->{peer:<3d} {nbytes / 2**20:9.2f} MiB {seconds * 1e3:10.3f} ms "
                      f"busbw {busbw:9.3f} GB/s")
        best = max(best, busbw)
    if best > 0 and math.isfinite(best):
        return [CollectiveBandwidth(op="p2p", group_size=2, scope=scope, bus_bandwidth_gbps=best)]
    return []


def profile_collectives(sizes_mb: list[float], warmup: int, repeats: int, precision: str = "bf16",
                        report: list[str] | None = None) -> list[CollectiveBandwidth]:
    """Bus bandwidths through deepspeed.comm (empty when the world has one rank). On one node: the
    collectives over the world (scope intra_node) and P2P rank 0 <-> 1. On several nodes: the world
    (inter_node), each node's ranks concurrently (intra_node), P2P inside node 0 and across nodes."""
    if any(not s > 0 for s in sizes_mb):
        raise SpecError(f"collective message sizes must be positive (got {sizes_mb!r})")
    import deepspeed.comm as dist
    if not dist.is_initialized():
        default_single_process_env(LAUNCHER_VARS)
        init_distributed()
    rt = _runtime(precision)
    if rt.world_size < 2:
        return []
    report = report if report is not None else []
    sizes = [max(1, round(s * 2 ** 20)) for s in sizes_mb]
    nodes = _node_layout(rt.world_size)
    single_node = len(nodes) == 1
    out = _group_collectives([list(range(rt.world_size))], "intra_node" if single_node else "inter_node",
                             sizes, warmup, repeats, rt, report)
    local = len(nodes[0])
    if not single_node and local >= 2 and all(len(n) == local for n in nodes):
        out += _group_collectives(nodes, "intra_node", sizes, warmup, repeats, rt, report)
    if local >= 2:
        out += _p2p(nodes[0][1], "intra_node", sizes, warmup, repeats, rt, report)
    if not single_node:
        out += _p2p(nodes[1][0], "inter_node", sizes, warmup, repeats, rt, report)
    return out


# ==================================================================================================
# CLI
# ==================================================================================================

def build_parser(prog: str = "uniap-deepspeed profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Measure layer times and collective bandwidths through DeepSpeed; write a uniap "
                               "profile JSON for `uniap plan --profile`.",
        epilog="single process: python -m uniap_deepspeed.profile ...; several: torchrun --nproc-per-node N "
               "-m uniap_deepspeed.profile ... (or the deepspeed launcher). Exit codes: 0 ok, 1 internal error, "
               "2 invalid input.")
    p.add_argument("--model", required=True, help="preset, uniap YAML/JSON spec, or Hugging Face config.json")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--decoder-seq-length", type=int, help="target length of an encoder-decoder model")
    p.add_argument("--micro-batch-sizes", type=int_list, default=[1, 2], help="comma-separated (default 1,2)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="the plan's precision (part of the layer signature; default bf16). GPUs compute in it; "
                        "the CPU computes in fp32")
    p.add_argument("--no-flash-attention", action="store_true",
                   help="time the unfused attention (s x s scores), as `uniap plan --no-flash-attention` plans")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed iterations: layers keep the median, the optimizer the median of max(repeats, 5) "
                        "steps, the calibration of max(repeats, 3) iterations; collectives average max(repeats, 5) "
                        "(default 5)")
    p.add_argument("--collective-sizes-mb", type=float_list,
                   help="message sizes in MiB (default 1,4 on CPU, 16,64,256 on GPU); the best bus bandwidth is kept")
    p.add_argument("--no-collectives", action="store_true", help="time layers only")
    p.add_argument("--no-layers", action="store_true", help="measure collectives only")
    p.add_argument("--calibration-layers", type=int, default=2,
                   help="transformer layers of the whole model trained to fit the profile's calibration "
                        "(default 2; 0: no calibration run)")
    p.add_argument("--calibration-micro-batches", type=int, default=2,
                   help="micro-batches (of the smallest --micro-batch-sizes) per calibration iteration (default 2)")
    p.add_argument("--device-name", help="the profile's device label (default: detected)")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write (refuses to overwrite without --force)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="log every measurement and DeepSpeed's info")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher adds it
    return p


def _check_args(args) -> tuple[ModelSpec, TrainingSpec]:
    check_common_args(args)
    if args.no_layers and args.no_collectives:
        raise SpecError("--no-layers and --no-collectives together leave nothing to measure")
    model = load_model(args.model)
    training = training_spec(model, max(args.micro_batch_sizes), args.seq_length, precision=args.precision,
                             flash_attention=not args.no_flash_attention, decoder_seq_length=args.decoder_seq_length)
    return model, training


def main_profile(argv: list[str] | None = None, prog: str = "uniap-deepspeed profile") -> int:
    """`uniap-deepspeed profile ...`: returns the exit code (0 ok, 2 invalid input)."""
    return run_profiler_cli(build_parser(prog), argv, prog, _check_args, _run)


def _run(args, model: ModelSpec, training: TrainingSpec) -> int:
    try:
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SpecError(f"the profiler needs torch and deepspeed ({exc})",
                        "pip install 'uniap[deepspeed]'") from None
    _quiet_deepspeed(args.verbose)
    default_single_process_env(LAUNCHER_VARS)
    rank, world, backend = init_distributed()
    import deepspeed.comm as dist

    started = time.perf_counter()
    if args.no_layers:
        import deepspeed as ds
        rt = _runtime(training.precision)
        notes = [CPU_NOTE] if rt.device_kind == "cpu" else []
        profile = Profile(device=args.device_name or device_description(), runtime=f"deepspeed {ds.__version__}",
                          backend=backend, notes="; ".join(notes + ["collectives only"]))
    else:
        profile = profile_model(model, training, args.micro_batch_sizes, args.warmup, args.repeats, args.device_name)
    report: list[str] = []
    if not args.no_collectives:
        sizes = args.collective_sizes_mb or list(
            DEFAULT_SIZES_MB_CPU if _accelerator().device_name() == "cpu" else DEFAULT_SIZES_MB_GPU)
        profile.collectives = profile_collectives(sizes, args.warmup, max(args.repeats, 5), training.precision,
                                                  report)
    if profile.optimizer is not None and rank == 0:
        o = profile.optimizer
        extra = f", {o.extra_peak_bytes / 2**20:.1f} MiB extra" if o.extra_peak_bytes is not None else ""
        report.append(f"optimizer {o.implementation}: {o.step_ms:.3f} ms per step over {o.num_params:,} "
                      f"parameters{extra}")
    if not args.no_layers and args.calibration_layers > 0:  # after the collectives: the plan prices DP with them
        from .training_run import calibrate
        profile, _ = calibrate(profile, model, training, args.calibration_layers, min(args.micro_batch_sizes),
                               args.calibration_micro_batches, args.warmup,
                               max(args.repeats, CALIBRATION_MIN_ITERATIONS), report)
    if rank == 0:
        try:
            profile.save(args.output)
        except OSError as exc:
            raise ProfileError(f"cannot write profile {args.output}: {exc.strerror or exc}") from None
        print_summary("uniap-deepspeed profile", profile, report, args.output, world, time.perf_counter() - started,
                      show_tp=False)
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    dist.destroy_process_group()  # an orderly teardown of the gloo/nccl pairs before the process exits
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main_profile(sys.argv[1:], prog="python -m uniap_deepspeed.profile"))
