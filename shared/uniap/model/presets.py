"""Built-in model presets (published hyperparameters)."""

from __future__ import annotations

from ..errors import UnknownPresetError
from .spec import ModelSpec


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    # GPT-3 (Brown et al. 2020, table 2.1); vocab 50257 as in GPT-2's BPE; learned positions, tied.
    return ModelSpec(
        name=name,
        architecture="decoder",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        vocab_size=50257,
        max_position_embeddings=2048,
    )


def _llama(
    name: str, layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int, max_pos: int
) -> ModelSpec:
    return ModelSpec(
        name=name,
        architecture="decoder",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
        gated_mlp=True,
        normalization="rmsnorm",
        tied_embeddings=False,
        position_embedding="rope",
        max_position_embeddings=max_pos,
        add_bias=False,
        dropout=0.0,
    )


MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _gpt3("gpt3-1.3b", 24, 2048, 16),
        _gpt3("gpt3-2.7b", 32, 2560, 32),
        _gpt3("gpt3-6.7b", 32, 4096, 32),
        _gpt3("gpt3-13b", 40, 5120, 40),
        _gpt3("gpt3-175b", 96, 12288, 96),
        _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
        _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
        _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
        _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
        _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
        # Llama 3.1 405B (Dubey et al. 2024, Table 3; Hugging Face meta-llama/Llama-3.1-405B config.json).
        _llama("llama3.1-405b", 126, 16384, 128, 8, 53248, 128256, 131072),
        ModelSpec(
            name="bert-large",
            architecture="encoder",
            num_layers=24,
            hidden_size=1024,
            num_attention_heads=16,
            ffn_hidden_size=4096,
            vocab_size=30522,
            max_position_embeddings=512,
        ),
        # BERT-Huge as in UniAP/Galvatron's experiments: 32 layers, hidden 1280, 16 heads.
        ModelSpec(
            name="bert-huge",
            architecture="encoder",
            num_layers=32,
            hidden_size=1280,
            num_attention_heads=16,
            ffn_hidden_size=5120,
            vocab_size=30522,
            max_position_embeddings=512,
        ),
        # T5-large (Raffel et al. 2020): 24+24 layers, d_model 1024, 16 heads x 64, d_ff 4096, ReLU.
        ModelSpec(
            name="t5-large",
            architecture="encoder_decoder",
            num_layers=24,
            num_decoder_layers=24,
            hidden_size=1024,
            num_attention_heads=16,
            ffn_hidden_size=4096,
            vocab_size=32128,
            normalization="rmsnorm",
            position_embedding="relative",
            max_position_embeddings=512,
            add_bias=False,
        ),
        # ViT-H/14 (Dosovitskiy et al. 2021): 32 layers, hidden 1280, 16 heads, MLP 5120.
        ModelSpec(
            name="vit-huge",
            architecture="vit",
            num_layers=32,
            hidden_size=1280,
            num_attention_heads=16,
            ffn_hidden_size=5120,
            image_size=224,
            patch_size=14,
            tied_embeddings=False,
            max_position_embeddings=257,
        ),
    )
}


def model_preset(name: str) -> ModelSpec:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise UnknownPresetError.of(
            "model preset",
            name,
            MODEL_PRESETS,
            "pass one of the presets, or a YAML/JSON spec file, or a Hugging Face config.json path",
        ) from None
