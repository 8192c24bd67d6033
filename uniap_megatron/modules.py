"""What megatron-core builds for a job of a ModelSpec, as Megatron-LM builds it: the layer spec and core
attention the plan assumes (Kernels), the TransformerConfig, one transformer layer, the embedding, the LM head,
the whole GPTModel, the training wrappers (Float16Module, DistributedDataParallel) and the Adam megatron-core
constructs. The profiler times these modules; the calibration run trains them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from uniap.model.spec import ModelSpec, TrainingSpec

from .environment import transformer_engine_available
from .runtime import cuda_calls_on_cpu, current_device, current_device_on_cpu, dtype_of, on_cuda

VOCAB_MULTIPLE = 128  # Megatron-LM's --make-vocab-size-divisible-by default (megatron/training/arguments.py)
DEFAULT_LR = 1e-4


# ==================================================================================================
# Kernels: the layer spec and core attention the plan assumes
# ==================================================================================================


ATTENTION_TE = "Transformer Engine"
ATTENTION_SDPA = "SDPA (flash when the GPU/dtype allow)"
ATTENTION_UNFUSED = "megatron-core DotProductAttention (unfused)"
ATTENTION_UNFUSED_CPU = "SDPA math backend (unfused; megatron-core DotProductAttention needs CUDA)"


@dataclass(frozen=True)
class Kernels:
    """Which megatron-core layer spec and core attention the profiler and the calibration run build:
    `spec` 'transformer_engine' or 'local', `attention` the kernel's label, `flash` whether it keeps no
    s x s score matrix (TrainingSpec.flash_attention, the signature's '/flash')."""

    spec: str
    attention: str
    flash: bool

    @property
    def te(self) -> bool:
        return self.spec == "transformer_engine"

    @property
    def spec_label(self) -> str:
        return (
            "Transformer Engine spec (get_gpt_layer_with_transformer_engine_spec)"
            if self.te
            else "local spec (get_gpt_layer_local_spec)"
        )


def choose_kernels(flash_attention: bool) -> Kernels:
    """The attention kernel the plan assumes: with flash attention Transformer Engine's spec where TE is
    importable (and a GPU present), else the local spec with SDPA; without it megatron-core's unfused
    DotProductAttention (on the CPU, which it cannot run on, SDPA's math backend computes the same)."""
    if flash_attention:
        if on_cuda() and transformer_engine_available():
            return Kernels("transformer_engine", ATTENTION_TE, True)
        return Kernels("local", ATTENTION_SDPA, True)
    return Kernels("local", ATTENTION_UNFUSED if on_cuda() else ATTENTION_UNFUSED_CPU, False)


@cache
def _sdpa_core_attention_class(math_only: bool):
    """A core attention with megatron-core DotProductAttention's constructor and forward signature
    (megatron-core 0.16.1 megatron/core/transformer/dot_product_attention.py) computed by
    torch.nn.functional.scaled_dot_product_attention: causal for a causal mask type, K/V groups repeated for
    GQA. SDPA picks its kernel (flash for bf16/fp16 on a GPU); `math_only` forces the math backend, which
    materialises the scores as the unfused kernel does."""
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class SdpaCoreAttention(MegatronModule):
        def __init__(
            self,
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=None,
            softmax_scale=None,
            cp_comm_type=None,
            pg_collection=None,
            **_,
        ):
            super().__init__(config=config)
            self.attn_mask_type = attn_mask_type
            self.softmax_scale = softmax_scale

        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            assert packed_seq_params is None, "packed sequences are not supported by SdpaCoreAttention"
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            s, b, heads, d = query.shape
            groups = key.shape[2]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            if groups != heads:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
            causal = mask_type == AttnMaskType.causal
            mask = None
            if not causal and attention_mask is not None:
                mask = ~attention_mask  # megatron masks are True where attention is NOT allowed
            with _sdpa_backend(math_only):
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.softmax_scale
                )
            return o.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    SdpaCoreAttention.__qualname__ = SdpaCoreAttention.__name__ = (
        "UnfusedSdpaCoreAttention" if math_only else "SdpaCoreAttention"
    )
    return SdpaCoreAttention


def _sdpa_backend(math_only: bool):
    if not math_only:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def layer_spec(model: ModelSpec, kernels: Kernels):
    """The megatron-core ModuleSpec of one transformer layer: TE's or the local spec, the core attention
    `kernels` names, no causal mask for an encoder."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.enums import AttnMaskType

    if kernels.te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=normalization_name(model))
    attn = spec.submodules.self_attention
    if model.architecture != "decoder":
        attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.no_mask}
    if kernels.attention in (ATTENTION_SDPA, ATTENTION_UNFUSED_CPU):
        attn.submodules.core_attention = _sdpa_core_attention_class(not kernels.flash)
    return spec


def normalization_name(model: ModelSpec) -> str:
    return "RMSNorm" if model.normalization == "rmsnorm" else "LayerNorm"


def sequence_parallel_supported(model: ModelSpec, kernels: Kernels) -> bool:
    """Whether the layer's norms take sequence parallelism: TE's and Apex's do; torch's (the local spec
    without Apex, and with RMSNorm always) refuse it (megatron-core 0.16.1 transformer/torch_norm.py,
    models/backends.py LocalSpecProvider.layer_norm)."""
    if not on_cuda():
        return False
    if kernels.te:
        return True
    from megatron.core.models.gpt import gpt_layer_specs

    return bool(getattr(gpt_layer_specs, "HAVE_APEX", False)) and model.normalization == "layernorm"


def activation_fusion(model: ModelSpec) -> bool:
    """Megatron-LM's default --bias-swiglu-fusion / --bias-gelu-fusion (megatron/training/arguments.py): the
    activation is a fused function that keeps only its input for backward (megatron-core 0.16.1
    megatron/core/fusions/fused_bias_swiglu.py), as uniap's activation count assumes. On a GPU only (its
    jit fuser); megatron-core fuses GELU only with biases."""
    return on_cuda() and (model.gated_mlp or model.add_bias)


def transformer_config(
    model: ModelSpec,
    training: TrainingSpec,
    tp: int,
    kernels: Kernels | None = None,
    num_layers: int = 1,
    gradient_accumulation_fusion: bool = False,
    recompute: str = "none",
):
    """A megatron-core TransformerConfig mirroring the ModelSpec at tensor-parallel degree `tp`, with
    `recompute` as the Megatron-LM arguments uniap emits set it (full: uniform, one layer per chunk)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    kernels = kernels or choose_kernels(training.flash_attention)
    cuda = on_cuda()
    dtype = dtype_of(training.precision)
    gated = {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu} if model.gated_mlp else {}
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization=normalization_name(model),
        add_bias_linear=model.add_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=tp > 1 and sequence_parallel_supported(model, kernels),
        use_cpu_initialization=not cuda,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        bias_activation_fusion=activation_fusion(model),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        **_recompute_fields(recompute),
        **gated,
    )


def _recompute_fields(recompute: str) -> dict[str, Any]:
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    return {}


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary Megatron-LM builds: padded to a multiple of 128 x TP (megatron/training/tokenizer
    _vocab_size_with_padding)."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def _in_precision(module, config):
    """`module` on this device in the precision Megatron-LM trains it in: Float16Module casts every
    parameter (megatron-core 0.16.1 megatron/core/transformer/module.py), fp32 otherwise."""
    module = module.to(current_device())
    if config.bf16:
        return module.bfloat16()
    if config.fp16:
        return module.half()
    return module


def norm_label(layer) -> str:
    """The norm a built TransformerLayer runs: its own module, or the linear TE fused it into."""
    norm = layer.input_layernorm
    kind = layer.config.normalization
    if type(norm).__name__ == "IdentityOp":
        fused = type(layer.self_attention.linear_qkv)
        return f"{kind} fused into {fused.__module__.split('.')[0]} {fused.__name__}"
    cls = type(norm)
    return f"{kind}: {cls.__module__.split('.')[0]} {cls.__name__}"


def build_transformer_layer(model: ModelSpec, training: TrainingSpec, tp: int, kernels: Kernels | None = None):
    """A megatron-core TransformerLayer of `kernels`' spec, in the training precision; (layer, config)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    kernels = kernels or choose_kernels(training.flash_attention)
    config = transformer_config(model, training, tp, kernels)
    layer = TransformerLayer(config=config, submodules=layer_spec(model, kernels).submodules, layer_number=1)
    return _in_precision(layer, config), config


def build_embedding(model: ModelSpec, training: TrainingSpec, tp: int, kernels: Kernels | None = None):
    """megatron-core's LanguageModelEmbedding as GPTModel (BERT: with two token types) builds it."""
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )

    config = transformer_config(model, training, tp, kernels)
    position = {"learned": "learned_absolute", "rope": "rope"}.get(model.position_embedding, "none")
    module = LanguageModelEmbedding(
        config=config,
        vocab_size=padded_vocab_size(model.vocab_size, tp),
        max_sequence_length=model.max_position_embeddings,
        position_embedding_type=position,
        num_tokentypes=2 if model.architecture == "encoder" else 0,
    )
    return _in_precision(module, config), config


@cache
def _lm_head_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_block import LayerNormImpl

    class LMHead(MegatronModule):
        """GPTModel's last stage (megatron-core 0.16.1 megatron/core/models/gpt/gpt_model.py): the
        TransformerBlock's final norm, the output ColumnParallelLinear (parallel output) and
        vocab_parallel_cross_entropy; forward returns the mean loss over the tokens."""

        def __init__(self, config, vocab_size: int):
            super().__init__(config=config)
            self.final_layernorm = build_module(
                LayerNormImpl, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
            )

        def forward(self, hidden, labels):
            logits, _ = self.output_layer(self.final_layernorm(hidden))
            return tensor_parallel.vocab_parallel_cross_entropy(logits, labels).float().mean()

    return LMHead


def build_lm_head(model: ModelSpec, training: TrainingSpec, tp: int, kernels: Kernels | None = None):
    config = transformer_config(model, training, tp, kernels)
    module = _lm_head_class()(config, padded_vocab_size(model.vocab_size, tp))
    return _in_precision(module, config), config


def rotary_embedding(model: ModelSpec, config, seq: int):
    """The RoPE frequencies GPTModel passes its layers (megatron-core 0.16.1 models/common/embeddings/
    rotary_pos_embedding.py RotaryEmbedding, rotary_percent 1, base 10000), or None without RoPE."""
    if model.position_embedding != "rope":
        return None
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )

    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, use_cpu_initialization=not on_cuda())
    with current_device_on_cpu():  # get_emb moves the frequencies to torch.cuda.current_device()
        return rope(seq)


def build_gpt_model(model: ModelSpec, training: TrainingSpec, kernels: Kernels | None = None, recompute: str = "none"):
    """megatron-core's GPTModel of `model` (all its layers; cut it first with reduced_model) on this device,
    in fp32 parameters on the CPU and the training precision's on a GPU; (model, config). Gradient
    accumulation fusion where Megatron-LM enables it: on a GPU with Apex's fused_weight_gradient_mlp_cuda
    (megatron-core 0.16.1 megatron/core/tensor_parallel/layers.py requires it)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import layers as tp_layers

    kernels = kernels or choose_kernels(training.flash_attention)
    fusion = on_cuda() and bool(getattr(tp_layers, "_grad_accum_fusion_available", False))
    config = transformer_config(
        model,
        training,
        1,
        kernels,
        num_layers=model.num_layers,
        gradient_accumulation_fusion=fusion,
        recompute=recompute,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, kernels),
        vocab_size=padded_vocab_size(model.vocab_size, 1),
        max_sequence_length=model.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tied_embeddings,
        position_embedding_type="rope" if model.position_embedding == "rope" else "learned_absolute",
    )
    return gpt.to(current_device()), config


# ==================================================================================================
# megatron-core's training wrappers and optimizer
# ==================================================================================================


def wrap_for_training(module, config):
    """`module` as Megatron-LM's get_model wraps it: Float16Module for bf16/fp16, then megatron-core
    DistributedDataParallel with an fp32 gradient buffer laid out for the distributed optimizer."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.transformer.module import Float16Module

    if config.bf16 or config.fp16:
        module = Float16Module(config, module)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    with cuda_calls_on_cpu():
        return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)


def megatron_optimizer(model, config, lr: float = DEFAULT_LR):
    """get_megatron_optimizer(OptimizerConfig(optimizer='adam', use_distributed_optimizer=True)) with
    Megatron-LM's defaults otherwise (weight decay 0.01, gradient clipping at 1.0); fp16 with a dynamic loss
    scale starting at 2^16."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    fp16_scale = {"initial_loss_scale": 2.0**16} if config.fp16 else {}
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        bf16=bool(config.bf16),
        fp16=bool(config.fp16),
        params_dtype=config.params_dtype or torch.float32,
        use_distributed_optimizer=True,
        **fp16_scale,
    )
    with cuda_calls_on_cpu():
        return get_megatron_optimizer(optimizer_config, [model])


def optimizer_name(optimizer) -> str:
    """The Adam inside megatron-core's optimizer wrappers, and the wrapper: e.g. 'Transformer Engine
    FusedAdam in megatron-core DistributedOptimizer'."""
    inner = optimizer
    while hasattr(inner, "chained_optimizers") and len(inner.chained_optimizers) == 1:
        inner = inner.chained_optimizers[0]
    base = getattr(inner, "optimizer", None)
    if base is None:
        return f"megatron-core {type(inner).__name__}"
    return f"{adam_name(base)} in megatron-core {type(inner).__name__}"


def megatron_adam(params: list) -> tuple[Any, str]:
    """The Adam megatron-core 0.16.1 constructs for OptimizerConfig(optimizer='adam') and its defaults
    (megatron/core/optimizer/__init__.py _get_megatron_optimizer_based_on_param_groups): TE's FusedAdam,
    else Apex's, in AdamW mode; else torch.optim.AdamW. (optimizer, its name)."""
    import torch
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(optimizer="adam", lr=1e-4)
    kwargs: dict[str, Any] = {
        "params": [{"params": params}],
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_eps,
    }
    if mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        cls = torch.optim.AdamW if config.decoupled_weight_decay else torch.optim.Adam
    else:
        cls = mcore_optimizer.Adam
        kwargs["adam_w_mode"] = config.decoupled_weight_decay
    optimizer = cls(**kwargs)
    return optimizer, adam_name(optimizer)


def adam_name(optimizer) -> str:
    """'Transformer Engine FusedAdam', 'Apex FusedAdam', or 'torch.optim.AdamW (foreach|for-loop|fused)'."""
    cls = type(optimizer)
    if cls.__module__.startswith("transformer_engine"):
        return f"Transformer Engine {cls.__name__}"
    if cls.__module__.startswith("apex"):
        return f"Apex {cls.__name__}"
    if cls.__module__.startswith("torch.optim"):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        if not fused and foreach is None:  # torch's default: foreach when every tensor is on a CUDA device
            foreach = bool(params) and all(p.is_cuda for p in params)
        mode = "fused" if fused else "foreach" if foreach else "for-loop"
        return f"torch.optim.{cls.__name__} ({mode})"
    return f"{cls.__module__}.{cls.__name__}"
