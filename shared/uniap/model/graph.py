"""The layer graph: a DAG of layers with per-sample sizes, built from a model and a training spec.

Every quantity on a `Layer` is for one sample (one sequence) at tensor-parallel degree 1; the cost
model scales it by micro-batch size and divides it over devices. Activation bytes follow Korthikanti
et al. (2022), split into the parts tensor parallelism always divides (`act_split`), the parts only
sequence parallelism divides (`act_seq`: layer-norm inputs, dropout masks, ...), and the attention-score
parts (`act_scores`, a*s^2 terms) that FlashAttention and selective recompute drop.

Consecutive identical layers form a *run*; the solver places and parallelizes runs with counts
instead of per-layer binaries (see solver.miqp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SpecError
from .spec import FP4, FP8, ModelSpec, TrainingSpec

CHAIN, SKIP = "chain", "skip"
# Layer kinds. Transformer layers (self-attention, or self- and cross-attention in T5's decoder) are the runs
# a framework parallelizes uniformly; embeddings and heads sit at the ends.
TRANSFORMER, CROSS_TRANSFORMER, EMBEDDING, HEAD = "transformer", "cross_transformer", "embedding", "head"
TRANSFORMER_KINDS = (TRANSFORMER, CROSS_TRANSFORMER)
# HBM bytes per logit the cross-entropy moves beyond the logits' own activations, in forward and again in
# backward (fp32 cast, max, shift, exp, sum, normalisation; the gradient's update and cast back): fitted to
# an LM head with its loss measured on an H200 (benchmarks/data/h200-2026-11-27-deepspeed-profile.json).
CROSS_ENTROPY_TRAFFIC = 18
# Bytes per value of a linear layer's input that Transformer Engine keeps for backward under FP8: the quantized
# copy it computed the forward GEMM from (transformer_engine/pytorch/module/linear.py, layernorm_linear.py).
FP8_BYTES = 1
# NVFP4 keeps 4 bits per value and one E4M3 scale per 16 values (Transformer Engine's NVFP4BlockScaling).
NVFP4_BYTES = 0.5 + 1 / 16


@dataclass(frozen=True)
class Layer:
    """One node of the graph. `signature` is equal for layers with equal costs (profile key).

    `flops_fwd` counts every matmul as the MFU convention does (the full s x s attention scores);
    `attention_flops` is the part of it in the attention scores and their product with V;
    `causal_attention_flops` the part of that under a causal mask, of which a flash kernel executes half.
    `extra_traffic` is memory-bound traffic per sample beyond its activations, in forward and again in
    backward (the LM head's cross-entropy over the vocabulary), split by TP. `hidden_size` is the model's.
    `kv_bytes` is the keys and values of the whole sequence its attention reads: what context parallelism's
    ring passes around its ranks. `logits` is a head's output values per sample (sequence x `vocab_size`): its
    output projection (2 x hidden_size FLOPs per logit) runs slowly where the vocabulary the framework builds is
    not aligned, and some frameworks' loss allocates per logit in backward. `linear_inputs` / `linear_outputs`:
    values per sample entering and leaving the layer's linear GEMMs (what FP8 quantizes: the inputs in forward,
    the output gradients in backward)."""

    name: str
    kind: str
    signature: str
    params_tp: int
    params_rep: int
    flops_fwd: float
    act_split: float
    act_seq: float
    act_scores: float
    input_bytes: float
    output_bytes: float
    tp_comm_bytes: float
    tied_weights: bool = False
    attention_flops: float = 0.0
    causal_attention_flops: float = 0.0
    extra_traffic: float = 0.0
    hidden_size: int = 0  # the model's; sizes the communication buckets of frameworks that scale them with it
    kv_bytes: float = 0.0
    vocab_size: int = 0
    logits: float = 0.0
    linear_inputs: float = 0.0
    linear_outputs: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "params_tp",
            "params_rep",
            "flops_fwd",
            "act_split",
            "act_seq",
            "act_scores",
            "input_bytes",
            "output_bytes",
            "tp_comm_bytes",
            "attention_flops",
            "causal_attention_flops",
            "extra_traffic",
            "kv_bytes",
            "vocab_size",
            "logits",
            "linear_inputs",
            "linear_outputs",
        ):
            if getattr(self, name) < 0:
                raise SpecError(f"invalid layer '{self.name}': field '{name}' must be >= 0")

    @property
    def params(self) -> int:
        return self.params_tp + self.params_rep


@dataclass(frozen=True)
class Edge:
    """Data flow u -> v. `chain`: v consumes u's output as its activation input (layout matters);
    `skip`: v reads u's output on the side (e.g. T5 cross-attention memory)."""

    src: int
    dst: int
    kind: str = CHAIN


@dataclass(frozen=True)
class Run:
    """Layers first..last (inclusive, consecutive in topological order), identical, chained."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass
class LayerGraph:
    """Layers in a topological order plus edges; validates acyclicity and computes runs."""

    layers: list[Layer]
    edges: list[Edge]
    divisibility: dict[str, int] = field(default_factory=dict)
    tokens_per_sample: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise SpecError("invalid layer graph: it has no layers")
        n = len(self.layers)
        for e in self.edges:
            if not (0 <= e.src < n and 0 <= e.dst < n):
                raise SpecError(f"invalid layer graph: edge {e.src}->{e.dst} names a missing layer")
            if e.src >= e.dst:
                raise SpecError(f"invalid layer graph: edge {e.src}->{e.dst} is not in topological order")
            if e.kind not in (CHAIN, SKIP):
                raise SpecError(f"invalid layer graph: edge kind '{e.kind}' (chain or skip)")
        self._succ: list[list[Edge]] = [[] for _ in range(n)]
        self._pred: list[list[Edge]] = [[] for _ in range(n)]
        for e in self.edges:
            self._succ[e.src].append(e)
            self._pred[e.dst].append(e)
        self.runs = self._find_runs()
        self.run_of = [0] * n
        for r, run in enumerate(self.runs):
            for u in range(run.first, run.last + 1):
                self.run_of[u] = r

    def succ(self, u: int) -> list[Edge]:
        return self._succ[u]

    def pred(self, u: int) -> list[Edge]:
        return self._pred[u]

    def _find_runs(self) -> list[Run]:
        """Maximal blocks u..w where each next layer is identical, fed only by a chain edge from its
        predecessor plus the same skip sources as the block's first layer, and each inner layer feeds
        only its successor. Costs inside such a block do not depend on which layer is which."""
        runs: list[Run] = []
        start = 0
        for v in range(1, len(self.layers) + 1):
            if v < len(self.layers) and self._extends(start, v):
                continue
            runs.append(Run(start, v - 1))
            start = v
        return runs

    def _extends(self, start: int, v: int) -> bool:
        u = v - 1
        if self.layers[v].signature != self.layers[start].signature:
            return False
        out_u = self.succ(u)
        if len(out_u) != 1 or out_u[0] != Edge(u, v, CHAIN):
            return False
        in_v = self.pred(v)
        skips_v = sorted(e.src for e in in_v if e.kind == SKIP)
        chains_v = [e.src for e in in_v if e.kind == CHAIN]
        skips_start = sorted(e.src for e in self.pred(start) if e.kind == SKIP)
        return chains_v == [u] and skips_v == skips_start


def build_graph(model: ModelSpec, training: TrainingSpec) -> LayerGraph:
    """The layer DAG of `model` trained with `training` (sequence length, precision, attention kernel)."""
    training.check_against(model)
    b = _Builder(model, training)
    return b.build()


class _Builder:
    def __init__(self, model: ModelSpec, training: TrainingSpec):
        self.m, self.t = model, training
        self.bpv = training.bytes_per_value
        self.layers: list[Layer] = []
        self.edges: list[Edge] = []

    def build(self) -> LayerGraph:
        m = self.m
        if m.architecture == "vit":
            s = m.vit_seq_length
            prev = self._add(self._patch_embedding(s))
            prev = self._stack(prev, "layer", m.num_layers, lambda: self._transformer("layer", s))
            self._add(self._vit_head(s), chain_from=prev)
        elif m.architecture == "encoder_decoder":
            se = self.t.seq_length
            sd = self.t.decoder_seq_length or se
            prev = self._add(self._embedding("encoder_embedding", se))
            enc_out = self._stack(prev, "encoder_layer", m.num_layers, lambda: self._transformer("encoder_layer", se))
            # The decoder reads the encoder's input embedding (T5's shared matrix): a tied copy.
            dec_emb = self._add(self._embedding("decoder_embedding", sd, tied=True))
            prev = dec_emb
            for i in range(m.num_decoder_layers):
                prev = self._add(self._cross_transformer(sd, se, i), chain_from=prev)
                self.edges.append(Edge(enc_out, prev, SKIP))
            self._add(self._lm_head(sd, tied=m.tied_embeddings), chain_from=prev)
        else:
            s = self.t.seq_length
            prev = self._add(self._embedding("embedding", s))
            prev = self._stack(prev, "layer", m.num_layers, lambda: self._transformer("layer", s))
            head = self._bert_head(s) if m.architecture == "encoder" else self._lm_head(s, tied=m.tied_embeddings)
            self._add(head, chain_from=prev)
        m, t = self.m, self.t
        tokens = {
            "vit": m.vit_seq_length,
            "encoder_decoder": t.seq_length + (t.decoder_seq_length or t.seq_length),
        }.get(m.architecture, t.seq_length)
        return LayerGraph(self.layers, self.edges, divisibility=self._divisibility(), tokens_per_sample=tokens)

    def _divisibility(self) -> dict[str, int]:
        """Quantities a TP degree must divide (megatron-core: heads, query groups, FFN, and under sequence
        parallelism the sequence; see strategy.tp_fits_layer)."""
        m, t = self.m, self.t
        seqs = {
            "vit": (m.vit_seq_length,),
            "encoder_decoder": (t.seq_length, t.decoder_seq_length or t.seq_length),
        }.get(m.architecture, (t.seq_length,))
        return {
            "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.query_groups,
            "ffn_hidden_size": m.ffn_hidden_size,
            "sequence_length": math.gcd(*seqs),
        }

    def _add(self, layer: Layer, chain_from: int | None = None) -> int:
        self.layers.append(layer)
        idx = len(self.layers) - 1
        if chain_from is not None:
            self.edges.append(Edge(chain_from, idx, CHAIN))
        return idx

    def _stack(self, prev: int, kind: str, count: int, make) -> int:
        layer = make()
        for i in range(count):
            prev = self._add(Layer(**{**layer.__dict__, "name": f"{kind}.{i}"}), chain_from=prev)
        return prev

    # --- per-layer physics -------------------------------------------------------------------------

    def _signature(self, kind: str, s: int, extra: str = "") -> str:
        m = self.m
        return (
            f"{kind}/h{m.hidden_size}/a{m.num_attention_heads}/g{m.query_groups}/d{m.head_dim}"
            f"/f{m.ffn_hidden_size}{'/glu' if m.gated_mlp else ''}{'/bias' if m.add_bias else ''}"
            f"/s{s}{extra}/{self.t.precision}{'/flash' if self.t.flash_attention else ''}"
            f"{'/' + self.t.quantized_recipe if self.t.quantized and kind in TRANSFORMER_KINDS else ''}"
        )

    def _linear_input_bytes(self) -> float:
        """Bytes per value of a linear layer's input kept for backward: its quantized copy under FP8 or FP4."""
        return {FP8: FP8_BYTES, FP4: NVFP4_BYTES}.get(self.t.quantized, self.bpv)

    def _norm_params(self) -> int:
        return (2 if self.m.normalization == "layernorm" else 1) * self.m.hidden_size

    def _attention(self, s_q: int, s_kv: int, self_attn: bool, causal: bool = False) -> dict[str, float]:
        """One attention block (its norm included): parameters, FLOPs and saved bytes per sample."""
        m, bpv = self.m, self.bpv
        h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim
        drop = m.dropout > 0
        mask = 1 if drop else 0
        params_tp = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.add_bias else 0)
        params_rep = self._norm_params() + (h if m.add_bias else 0)
        attention_flops = 4 * s_q * s_kv * q  # Q K^T and the product with V
        flops = 2 * s_q * h * q + 2 * s_kv * h * 2 * kv + 2 * s_q * q * h + attention_flops
        lin = self._linear_input_bytes()
        act_seq = bpv * s_q * h + lin * s_q * h + mask * s_q * h  # norm input, Q(KV) input, output dropout mask
        if not self_attn:
            act_seq += lin * s_kv * h  # the encoder output that K and V are computed from
        act_split = bpv * s_q * q + bpv * s_kv * 2 * kv + lin * s_q * q  # Q, K, V, projection input
        if self.t.flash_attention:
            scores = 4 * m.num_attention_heads * s_q  # the softmax statistics (fp32) only
        else:
            scores = m.num_attention_heads * s_q * s_kv * (bpv + (mask + bpv if drop else 0))
        return dict(
            params_tp=params_tp,
            params_rep=params_rep,
            flops=flops,
            act_seq=act_seq,
            act_split=act_split,
            scores=scores,
            attention_flops=attention_flops,
            causal_attention_flops=attention_flops if causal else 0.0,
            kv_bytes=bpv * s_kv * 2 * kv,
            linear_inputs=(s_q if self_attn else s_q + s_kv) * h + s_q * q,
            linear_outputs=s_q * q + s_kv * 2 * kv + s_q * h,
        )

    def _mlp(self, s: int) -> dict[str, float]:
        m, bpv = self.m, self.bpv
        h, f = m.hidden_size, m.ffn_hidden_size
        up = 2 if m.gated_mlp else 1
        params_tp = (up + 1) * h * f + (up * f if m.add_bias else 0)
        params_rep = self._norm_params() + (h if m.add_bias else 0)
        flops = 2 * s * (up + 1) * h * f
        lin = self._linear_input_bytes()
        act_seq = bpv * s * h + lin * s * h + (s * h if m.dropout > 0 else 0)  # norm input, fc1 input, mask
        act_split = bpv * s * f * up + lin * s * f  # fc1 output(s), fc2 input
        return dict(
            params_tp=params_tp,
            params_rep=params_rep,
            flops=flops,
            act_seq=act_seq,
            act_split=act_split,
            scores=0.0,
            attention_flops=0.0,
            causal_attention_flops=0.0,
            kv_bytes=0.0,
            linear_inputs=s * h + s * f,
            linear_outputs=s * up * f + s * h,
        )

    def _combine(
        self, name: str, kind: str, s: int, parts: list[dict[str, float]], tp_comm: float, extra_sig: str = ""
    ) -> Layer:
        bpv, h = self.bpv, self.m.hidden_size
        return Layer(
            name=name,
            kind=kind,
            hidden_size=self.m.hidden_size,
            signature=self._signature(kind, s, extra_sig),
            params_tp=int(sum(p["params_tp"] for p in parts)),
            params_rep=int(sum(p["params_rep"] for p in parts)),
            flops_fwd=float(sum(p["flops"] for p in parts)),
            act_split=float(sum(p["act_split"] for p in parts)),
            act_seq=float(sum(p["act_seq"] for p in parts)),
            act_scores=float(sum(p["scores"] for p in parts)),
            input_bytes=float(bpv * s * h),
            output_bytes=float(bpv * s * h),
            tp_comm_bytes=float(tp_comm),
            attention_flops=float(sum(p["attention_flops"] for p in parts)),
            causal_attention_flops=float(sum(p["causal_attention_flops"] for p in parts)),
            kv_bytes=float(sum(p["kv_bytes"] for p in parts)),
            linear_inputs=float(sum(p["linear_inputs"] for p in parts)),
            linear_outputs=float(sum(p["linear_outputs"] for p in parts)),
        )

    def _transformer(self, kind: str, s: int) -> Layer:
        h = self.m.hidden_size
        causal = self.m.architecture == "decoder"  # GPT/Llama; encoders and ViT attend both ways
        return self._combine(
            kind, TRANSFORMER, s, [self._attention(s, s, True, causal), self._mlp(s)], tp_comm=2 * self.bpv * s * h
        )

    def _cross_transformer(self, s: int, s_enc: int, i: int) -> Layer:
        h, bpv = self.m.hidden_size, self.bpv
        layer = self._combine(
            f"decoder_layer.{i}",
            CROSS_TRANSFORMER,
            s,
            [self._attention(s, s, True, causal=True), self._attention(s, s_enc, False), self._mlp(s)],
            tp_comm=3 * bpv * s * h + bpv * s_enc * h,
            extra_sig=f"/x{s_enc}",
        )
        return layer

    def _embedding(self, name: str, s: int, tied: bool = False) -> Layer:
        m, bpv = self.m, self.bpv
        h = m.hidden_size
        pos = m.max_position_embeddings * h if m.position_embedding == "learned" else 0
        types = 2 * h if m.architecture == "encoder" else 0
        return Layer(
            name=name,
            kind=EMBEDDING,
            hidden_size=self.m.hidden_size,
            signature=self._signature("embedding", s, f"/v{m.vocab_size}"),
            params_tp=m.vocab_size * h,
            params_rep=pos + types,
            flops_fwd=0.0,
            act_split=0.0,
            act_seq=float(s * h if m.dropout > 0 else 0),
            act_scores=0.0,
            input_bytes=float(8 * s),
            output_bytes=float(bpv * s * h),
            tp_comm_bytes=float(bpv * s * h),
            tied_weights=tied,
        )

    def _lm_head(self, s: int, tied: bool) -> Layer:
        """Final norm, output projection and vocab-parallel cross-entropy: the logits in the compute precision
        and their fp32 softmax live together at the loss (megatron-core tensor_parallel/cross_entropy.py
        casts the logits to fp32 and keeps exp_logits for backward)."""
        m, bpv = self.m, self.bpv
        h, v = m.hidden_size, m.vocab_size
        return Layer(
            name="lm_head",
            kind=HEAD,
            hidden_size=self.m.hidden_size,
            signature=self._signature("lm_head", s, f"/v{v}"),
            params_tp=v * h,
            params_rep=self._norm_params(),
            flops_fwd=float(2 * s * h * v),
            act_split=float((bpv + 4) * s * v),
            act_seq=float(2 * bpv * s * h),
            act_scores=0.0,
            input_bytes=float(bpv * s * h),
            output_bytes=0.0,
            tp_comm_bytes=float(bpv * s * h),
            tied_weights=tied,
            extra_traffic=float(CROSS_ENTROPY_TRAFFIC * s * v),
            vocab_size=v,
            logits=float(s * v),
        )

    def _bert_head(self, s: int) -> Layer:
        """Pooler, masked-LM transform (dense + norm) and the tied output projection."""
        m, bpv = self.m, self.bpv
        h, v = m.hidden_size, m.vocab_size
        return Layer(
            name="mlm_head",
            kind=HEAD,
            hidden_size=self.m.hidden_size,
            signature=self._signature("mlm_head", s, f"/v{v}"),
            params_tp=v * h,
            params_rep=2 * (h * h + h) + self._norm_params(),
            flops_fwd=float(2 * s * h * h + 2 * s * h * v),
            act_split=float((bpv + 4) * s * v),
            act_seq=float(3 * bpv * s * h),
            act_scores=0.0,
            input_bytes=float(bpv * s * h),
            output_bytes=0.0,
            tp_comm_bytes=float(bpv * s * h),
            tied_weights=m.tied_embeddings,
            vocab_size=v,
            logits=float(s * v),
        )

    def _patch_embedding(self, s: int) -> Layer:
        m, bpv = self.m, self.bpv
        h, pix = m.hidden_size, m.patch_size**2 * m.num_channels
        return Layer(
            name="patch_embedding",
            kind=EMBEDDING,
            hidden_size=self.m.hidden_size,
            signature=self._signature("patch_embedding", s, f"/p{m.patch_size}"),
            params_tp=0,
            params_rep=pix * h + h + s * h + h,
            flops_fwd=float(2 * (s - 1) * pix * h),
            act_split=0.0,
            act_seq=float(bpv * (s - 1) * pix),
            act_scores=0.0,
            input_bytes=float(bpv * (s - 1) * pix),
            output_bytes=float(bpv * s * h),
            tp_comm_bytes=0.0,
        )

    def _vit_head(self, s: int) -> Layer:
        m, bpv = self.m, self.bpv
        h = m.hidden_size
        return Layer(
            name="cls_head",
            kind=HEAD,
            hidden_size=self.m.hidden_size,
            signature=self._signature("cls_head", s, f"/c{m.num_classes}"),
            params_tp=0,
            params_rep=self._norm_params() + h * m.num_classes + m.num_classes,
            flops_fwd=float(2 * h * m.num_classes),
            act_split=0.0,
            act_seq=float(bpv * s * h),
            act_scores=0.0,
            input_bytes=float(bpv * s * h),
            output_bytes=0.0,
            tp_comm_bytes=0.0,
        )
