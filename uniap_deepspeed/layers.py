"""The torch modules `uniap-deepspeed profile` times and its calibration run trains: one per layer kind of the
layer graph (uniap.model.graph), built from the ModelSpec with dropout 0. Each module but the building
blocks has `example_inputs(b, device, dtype)`, a micro-batch of b samples to run it on.

Imports torch: uniap_deepspeed.profile imports this file only when it builds a layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uniap.model.graph import CROSS_TRANSFORMER, EMBEDDING, HEAD, TRANSFORMER, Layer
from uniap.model.spec import ModelSpec, TrainingSpec

# The norms' epsilon and RoPE's base, megatron-core 0.16.1's defaults (transformer/transformer_config.py
# layernorm_epsilon, models/gpt/gpt_model.py rotary_base).
NORM_EPS = 1e-5
ROPE_BASE = 10000
# Embedding tables start as megatron-core's (init_method_std, transformer_config.py) and Hugging Face GPT-2's
# (initializer_range) do: torch's N(0, 1) would make a tied output projection's first logits ~sqrt(h) large.
EMBEDDING_INIT_STD = 0.02


def norm(m: ModelSpec) -> nn.Module:
    """The model's norm over the hidden size."""
    if m.normalization == "rmsnorm":
        return nn.RMSNorm(m.hidden_size, eps=NORM_EPS)
    return nn.LayerNorm(m.hidden_size, eps=NORM_EPS)


def rope_tables(s: int, d: int, device, dtype):
    """RoPE's cos and sin tables for `s` positions of head dimension `d` (the rotate-half layout)."""
    inv = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """`x` (b, heads, s, d) rotated by the tables of rope_tables."""
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
    """Self-attention then the MLP, each added to its input (causal for a decoder)."""

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
        return (
            torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
            torch.randn(b, self.s_enc, self.h, device=device, dtype=dtype, requires_grad=True),
        )


class Embedding(nn.Module):
    """Word embedding (+ learned positions, + token types for an encoder)."""

    def __init__(self, m: ModelSpec, s: int):
        super().__init__()
        self.s, self.vocab = s, m.vocab_size
        self.word_embeddings = nn.Embedding(m.vocab_size, m.hidden_size)
        self.position_embeddings = (
            nn.Embedding(m.max_position_embeddings, m.hidden_size) if m.position_embedding == "learned" else None
        )
        self.tokentype_embeddings = nn.Embedding(2, m.hidden_size) if m.architecture == "encoder" else None
        for table in (self.word_embeddings, self.position_embeddings, self.tokentype_embeddings):
            if table is not None:
                nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)

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


class _TokenHead(nn.Module):
    """A head over the hidden states of `s` tokens with a label per token."""

    def __init__(self, m: ModelSpec, s: int):
        super().__init__()
        self.s, self.h, self.vocab = s, m.hidden_size, m.vocab_size

    def example_inputs(self, b, device, dtype):
        return (
            torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
            torch.randint(0, self.vocab, (b, self.s), device=device),
        )


class LMHead(_TokenHead):
    """Final norm, output projection, cross-entropy on fp32 logits; returns the loss."""

    def __init__(self, m: ModelSpec, s: int):
        super().__init__(m, s)
        self.final_norm = norm(m)
        self.output_layer = nn.Linear(m.hidden_size, m.vocab_size, bias=False)

    def forward(self, x, labels):
        logits = self.output_layer(self.final_norm(x)).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))


class MLMHead(_TokenHead):
    """BERT: pooler on the first token, masked-LM transform (dense, GeLU, norm), output projection."""

    def __init__(self, m: ModelSpec, s: int):
        super().__init__(m, s)
        self.pooler = nn.Linear(m.hidden_size, m.hidden_size)
        self.dense = nn.Linear(m.hidden_size, m.hidden_size)
        self.norm = norm(m)
        self.output_layer = nn.Linear(m.hidden_size, m.vocab_size, bias=False)  # as the graph counts it

    def forward(self, x, labels):
        pooled = torch.tanh(self.pooler(x[:, 0]))
        logits = self.output_layer(self.norm(F.gelu(self.dense(x)))).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1)) + pooled.float().mean()


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
        return (
            torch.randn(b, self.s, self.h, device=device, dtype=dtype, requires_grad=True),
            torch.randint(0, self.classes, (b,), device=device),
        )


def build_layer_module(model: ModelSpec, training: TrainingSpec, layer: Layer):
    """A torch module computing `layer` of the graph (one instance, dropout 0) with `example_inputs(b,
    device, dtype)`; None for a layer kind this profiler does not know."""
    flash = training.flash_attention
    s = training.seq_length
    s_dec = training.decoder_seq_length or s
    arch = model.architecture
    if arch == "vit":
        s = model.vit_seq_length
    base = layer.name.split(".")[0]
    if layer.kind == TRANSFORMER:
        return TransformerLayer(model, s, causal=arch == "decoder", flash=flash)
    if layer.kind == CROSS_TRANSFORMER:
        return CrossTransformerLayer(model, s_dec, s, flash=flash)
    if layer.kind == EMBEDDING:
        if base == "patch_embedding":
            return PatchEmbedding(model)
        return Embedding(model, s_dec if base == "decoder_embedding" else s)
    if layer.kind == HEAD:
        if base == "lm_head":
            return LMHead(model, s_dec if arch == "encoder_decoder" else s)
        if base == "mlm_head":
            return MLMHead(model, s)
        if base == "cls_head":
            return ClsHead(model, s)
    return None
