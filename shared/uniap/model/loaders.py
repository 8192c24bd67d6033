"""Model specs from files: uniap's own YAML/JSON, or a Hugging Face `config.json` on disk (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..io import check_file_ref, is_file_ref, read_mapping
from .presets import MODEL_PRESETS, model_preset
from .spec import ModelSpec


def load_model(ref: str) -> ModelSpec:
    """A preset name, a uniap YAML/JSON spec file, or a Hugging Face config.json (file or folder)."""
    if ref in MODEL_PRESETS:
        return MODEL_PRESETS[ref]
    if not is_file_ref(ref):
        check_file_ref(ref, "model")
        return model_preset(ref)  # raises with the list of presets
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SpecError(
                f"model folder {path} has no config.json",
                "point --model at a Hugging Face config.json, a uniap YAML/JSON spec, or a preset",
            )
        path = path / "config.json"
    data = read_mapping(path, "model")
    if "model_type" in data or "architectures" in data:
        return from_hf_config(data, name=path.parent.name if path.name == "config.json" else path.stem)
    data.setdefault("name", path.stem)
    return ModelSpec.from_dict(data)


# The fields by which Hugging Face configs declare routed experts (Mixtral/Mistral, Qwen-MoE, DeepSeek, OLMoE,
# GPT-OSS: transformers' configuration_*.py of each).
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is None:
        raise SpecError(f"Hugging Face config has none of the fields {', '.join(keys)}")
    return default


def _typed(cfg: dict[str, Any], key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
    """`cfg[key]` (or `default` where it is absent or null) when it is of `kinds`; SpecError naming the field
    otherwise (a bool is not a number here: JSON's true is not 1 layer)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise SpecError(f"Hugging Face config field '{key}' must be {what} (got {value!r})")
    return value


def _flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    return _typed(cfg, key, default, (bool,), "true or false")


def _probability(cfg: dict[str, Any], key: str, default: float) -> float:
    value = float(_typed(cfg, key, default, (int, float), "a number"))
    if not 0.0 <= value <= 1.0:
        raise SpecError(f"Hugging Face config field '{key}' must be a probability in [0, 1] (got {value!r})")
    return value


def _positive(cfg: dict[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` present, a positive integer (SpecError otherwise, or when none is and there is no
    default)."""
    value = _get(cfg, *keys, default=default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"Hugging Face config field '{keys[0]}' must be a positive integer (got {value!r})")
    return value


def from_hf_config(cfg: dict[str, Any], name: str = "hf-model") -> ModelSpec:
    """Translate a Hugging Face config.json (llama/mistral/qwen2, gpt2, bert/roberta, t5, vit)."""
    kind = cfg.get("model_type", "")
    experts = [key for key in MOE_FIELDS if cfg.get(key)]
    if experts:
        raise SpecError(
            f"Hugging Face config of a mixture-of-experts model ({', '.join(experts)}): uniap plans dense "
            f"models only so far; planning it as dense would price the wrong model",
            "plan the dense model it is based on, or wait for expert parallelism (issue 24)",
        )
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        heads = _positive(cfg, "num_attention_heads")
        return ModelSpec(
            name=name,
            architecture="decoder",
            num_layers=_positive(cfg, "num_hidden_layers"),
            hidden_size=_positive(cfg, "hidden_size"),
            num_attention_heads=heads,
            num_query_groups=_positive(cfg, "num_key_value_heads", default=heads),
            kv_channels=cfg.get("head_dim"),
            ffn_hidden_size=_positive(cfg, "intermediate_size"),
            vocab_size=_positive(cfg, "vocab_size"),
            gated_mlp=True,
            normalization="rmsnorm",
            tied_embeddings=_flag(cfg, "tie_word_embeddings", False),
            position_embedding="rope",
            max_position_embeddings=_positive(cfg, "max_position_embeddings"),
            add_bias=_flag(cfg, "attention_bias", kind == "qwen2"),
            dropout=_probability(cfg, "attention_dropout", 0.0),
        )
    if kind == "gpt2":
        hidden = _positive(cfg, "n_embd", "hidden_size")
        return ModelSpec(
            name=name,
            architecture="decoder",
            num_layers=_positive(cfg, "n_layer", "num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=_positive(cfg, "n_head", "num_attention_heads"),
            ffn_hidden_size=_positive(cfg, "n_inner", default=4 * hidden),
            vocab_size=_positive(cfg, "vocab_size"),
            max_position_embeddings=_positive(cfg, "n_positions", "max_position_embeddings"),
            dropout=_probability(cfg, "resid_pdrop", 0.1),
        )
    if kind in ("bert", "roberta"):
        return ModelSpec(
            name=name,
            architecture="encoder",
            num_layers=_positive(cfg, "num_hidden_layers"),
            hidden_size=_positive(cfg, "hidden_size"),
            num_attention_heads=_positive(cfg, "num_attention_heads"),
            ffn_hidden_size=_positive(cfg, "intermediate_size"),
            vocab_size=_positive(cfg, "vocab_size"),
            max_position_embeddings=_positive(cfg, "max_position_embeddings"),
            dropout=_probability(cfg, "hidden_dropout_prob", 0.1),
        )
    if kind in ("t5", "mt5"):
        layers = _positive(cfg, "num_layers")
        proj = cfg.get("feed_forward_proj", "relu")
        return ModelSpec(
            name=name,
            architecture="encoder_decoder",
            num_layers=layers,
            num_decoder_layers=_positive(cfg, "num_decoder_layers", default=layers),
            hidden_size=_positive(cfg, "d_model"),
            num_attention_heads=_positive(cfg, "num_heads"),
            kv_channels=_positive(cfg, "d_kv"),
            ffn_hidden_size=_positive(cfg, "d_ff"),
            vocab_size=_positive(cfg, "vocab_size"),
            gated_mlp=str(proj).startswith("gated"),
            normalization="rmsnorm",
            tied_embeddings=_flag(cfg, "tie_word_embeddings", True),
            position_embedding="relative",
            max_position_embeddings=_positive(cfg, "n_positions", default=512),
            add_bias=False,
            dropout=_probability(cfg, "dropout_rate", 0.1),
        )
    if kind == "vit":
        image, patch = _positive(cfg, "image_size"), _positive(cfg, "patch_size")
        return ModelSpec(
            name=name,
            architecture="vit",
            num_layers=_positive(cfg, "num_hidden_layers"),
            hidden_size=_positive(cfg, "hidden_size"),
            num_attention_heads=_positive(cfg, "num_attention_heads"),
            ffn_hidden_size=_positive(cfg, "intermediate_size"),
            image_size=image,
            patch_size=patch,
            num_channels=_positive(cfg, "num_channels", default=3),
            num_classes=len(_typed(cfg, "id2label", {}, (dict, list), "a mapping of labels")) or 1000,
            tied_embeddings=False,
            max_position_embeddings=(image // patch) ** 2 + 1,
            dropout=_probability(cfg, "hidden_dropout_prob", 0.0),
        )
    raise SpecError(
        f"Hugging Face model_type '{kind}' is not supported; supported: llama, mistral, qwen2, "
        f"qwen3, gpt2, bert, roberta, t5, mt5, vit",
        "write a uniap model spec (YAML) with the same hyperparameters",
    )
