"""Tests of model specs, presets, loaders, the layer graph, activation memory and cluster specs.

Reference numbers: published parameter counts (Hugging Face checkpoints / papers), the GPT FLOPs
formula of Narayanan et al. (SC'21, arXiv 2104.04473) and the activation-memory formulas of Korthikanti
et al. (2022, arXiv 2205.05198).
"""

from __future__ import annotations

import json
import math

import pytest

from uniap.cluster.spec import CLUSTER_PRESETS, ClusterSpec, cluster_preset, load_cluster
from uniap.cost.model import activation_bytes
from uniap.errors import SpecError, UnknownPresetError
from uniap.model import (
    CHAIN,
    MODEL_PRESETS,
    SKIP,
    Edge,
    LayerGraph,
    ModelSpec,
    TrainingSpec,
    build_graph,
    from_hf_config,
    load_model,
    model_preset,
)


# --- helpers -----------------------------------------------------------------------------------------


def _seq_for(model: ModelSpec) -> int:
    """A sequence length the model accepts (ViT ignores it)."""
    return min(2048, model.max_position_embeddings)


def _graph(model: ModelSpec, **training) -> LayerGraph:
    training.setdefault("global_batch_size", 8)
    training.setdefault("seq_length", _seq_for(model))
    return build_graph(model, TrainingSpec(**training))


def _param_count(graph: LayerGraph) -> int:
    """Parameters of the model with tied matrices counted once.

    A layer with tied_weights carries in params_tp a copy of a matrix another layer owns (the tied LM
    head, T5's decoder embedding), so its params_tp is not counted."""
    total = sum(layer.params for layer in graph.layers)
    return total - sum(layer.params_tp for layer in graph.layers if layer.tied_weights)


def _expected_layer_count(model: ModelSpec) -> int:
    if model.architecture == "encoder_decoder":
        return 1 + model.num_layers + 1 + model.num_decoder_layers + 1
    return 1 + model.num_layers + 1


def _gpt_like(name="gpt-test", layers=4, hidden=1024, heads=16, vocab=50304, max_pos=4096, dropout=0.1) -> ModelSpec:
    return ModelSpec(
        name=name,
        architecture="decoder",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        vocab_size=vocab,
        num_query_groups=None,
        gated_mlp=False,
        dropout=dropout,
        max_position_embeddings=max_pos,
    )


def _transformer_layer(model: ModelSpec, s: int, flash: bool, precision: str = "bf16"):
    g = build_graph(model, TrainingSpec(global_batch_size=8, seq_length=s, flash_attention=flash, precision=precision))
    layers = [layer for layer in g.layers if layer.kind == "transformer"]
    assert len(layers) == model.num_layers
    return layers[0]


def _close(actual: float, expected: float, rel: float = 1e-9) -> bool:
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=0.0)


# --- 1. presets build graphs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds_a_graph(name):
    model = MODEL_PRESETS[name]
    assert model.name == name
    assert model_preset(name) is model
    g = _graph(model)
    assert len(g.layers) == _expected_layer_count(model)
    assert g.layers[0].kind == "embedding"
    assert g.layers[-1].kind == "head"
    n_transformer = sum(1 for layer in g.layers if layer.kind in ("transformer", "cross_transformer"))
    assert n_transformer == model.num_layers + model.num_decoder_layers
    # edges are in topological order and every layer but the sources has an incoming edge
    assert all(e.src < e.dst for e in g.edges)
    # runs partition the layers, in order
    covered = [u for run in g.runs for u in range(run.first, run.last + 1)]
    assert covered == list(range(len(g.layers)))
    assert all(g.runs[g.run_of[u]].first <= u <= g.runs[g.run_of[u]].last for u in range(len(g.layers)))
    # every quantity is a per-sample non-negative number, transformer layers have FLOPs and parameters
    for layer in g.layers:
        if layer.kind in ("transformer", "cross_transformer"):
            assert layer.flops_fwd > 0 and layer.params_tp > 0 and layer.act_split > 0
    assert g.divisibility == {
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.query_groups,
        "ffn_hidden_size": model.ffn_hidden_size,
        "sequence_length": model.vit_seq_length if model.architecture == "vit" else _seq_for(model),
    }


@pytest.mark.parametrize(
    "name", [n for n, m in MODEL_PRESETS.items() if m.architecture in ("decoder", "encoder", "vit")]
)
def test_single_stack_presets_are_chains_with_three_runs(name):
    model = MODEL_PRESETS[name]
    g = _graph(model)
    n = len(g.layers)
    assert g.edges == [Edge(i, i + 1, CHAIN) for i in range(n - 1)]
    assert [(r.first, r.last) for r in g.runs] == [(0, 0), (1, model.num_layers), (n - 1, n - 1)]


def test_llama2_7b_layers_and_runs():
    g = _graph(model_preset("llama2-7b"), seq_length=4096)
    assert len(g.layers) == 34
    assert [(r.first, r.last) for r in g.runs] == [(0, 0), (1, 32), (33, 33)]
    assert [r.size for r in g.runs] == [1, 32, 1]
    assert g.layers[0].name == "embedding" and g.layers[33].name == "lm_head"
    assert [layer.name for layer in g.layers[1:33]] == [f"layer.{i}" for i in range(32)]
    assert len({layer.signature for layer in g.layers[1:33]}) == 1
    assert g.tokens_per_sample == 4096


def test_t5_graph_is_a_dag_with_skip_edges():
    model = model_preset("t5-large")
    g = _graph(model, seq_length=512, decoder_seq_length=128)
    # enc emb + 24 enc + dec emb + 24 dec + head
    assert len(g.layers) == 1 + 24 + 1 + 24 + 1 == 51
    names = [layer.name for layer in g.layers]
    assert names[0] == "encoder_embedding"
    assert names[1:25] == [f"encoder_layer.{i}" for i in range(24)]
    assert names[25] == "decoder_embedding"
    assert names[26:50] == [f"decoder_layer.{i}" for i in range(24)]
    assert names[50] == "lm_head"
    last_enc = 24
    skips = [e for e in g.edges if e.kind == SKIP]
    assert sorted((e.src, e.dst) for e in skips) == [(last_enc, d) for d in range(26, 50)]
    for d in range(26, 50):
        preds = g.pred(d)
        assert Edge(last_enc, d, SKIP) in preds
        assert Edge(d - 1, d, CHAIN) in preds
        assert len(preds) == 2
    # not a chain: the last encoder layer feeds 24 decoder layers, decoder layers have two inputs
    assert len(g.succ(last_enc)) == 24
    assert g.pred(25) == []  # the decoder embedding is a second source
    assert [(r.first, r.last) for r in g.runs] == [(0, 0), (1, 24), (25, 25), (26, 49), (50, 50)]
    assert g.tokens_per_sample == 512 + 128
    assert all("/x512" in g.layers[d].signature for d in range(26, 50))
    assert g.layers[25].tied_weights and g.layers[25].params_tp == g.layers[0].params_tp
    assert g.layers[50].tied_weights


def test_graph_rejects_back_edges_and_missing_layers():
    g = _graph(_gpt_like(layers=2), seq_length=128)
    with pytest.raises(SpecError, match="topological"):
        LayerGraph(g.layers, [Edge(2, 1, CHAIN)])
    with pytest.raises(SpecError, match="missing layer"):
        LayerGraph(g.layers, [Edge(0, 99, CHAIN)])
    with pytest.raises(SpecError, match="edge kind"):
        LayerGraph(g.layers, [Edge(0, 1, "sideways")])
    with pytest.raises(SpecError, match="no layers"):
        LayerGraph([], [])


def test_run_breaks_where_a_layer_has_a_side_output():
    g = _graph(_gpt_like(layers=6), seq_length=128)  # layers 1..6 identical, head at 7
    # layer 3 feeds layer 5 on the side: 3 has two successors (ends its run); 5 has a skip input that
    # 4 lacks (starts a run); 6 lacks the skip input that 5 has (starts another)
    g1 = LayerGraph(g.layers, list(g.edges) + [Edge(3, 5, SKIP)])
    assert [(r.first, r.last) for r in g1.runs] == [(0, 0), (1, 3), (4, 4), (5, 5), (6, 6), (7, 7)]
    # layers 5 and 6 both read layer 3 on the side (as T5's decoder layers read the encoder): one run
    g2 = LayerGraph(g.layers, list(g.edges) + [Edge(3, 5, SKIP), Edge(3, 6, SKIP)])
    assert [(r.first, r.last) for r in g2.runs] == [(0, 0), (1, 3), (4, 4), (5, 6), (7, 7)]
    assert g2.run_of == [0, 1, 1, 1, 2, 3, 3, 4]


# --- 2. parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, published, rel",
    [
        ("llama2-7b", 6.74e9, 0.01),
        ("llama2-70b", 69e9, 0.02),
        ("llama3-8b", 8.03e9, 0.01),
        ("gpt3-175b", 175e9, 0.02),
        ("bert-large", 335e6, 0.03),
        ("gpt3-1.3b", 1.3e9, 0.05),
        ("llama2-13b", 13.0e9, 0.01),
        ("llama3-70b", 70.6e9, 0.01),
        ("t5-large", 737.67e6, 0.01),
        ("vit-huge", 632e6, 0.01),
    ],
)
def test_parameter_counts_match_published_sizes(name, published, rel):
    g = _graph(model_preset(name))
    count = _param_count(g)
    assert abs(count - published) / published <= rel, f"{name}: {count:,} vs {published:,.0f}"


@pytest.mark.parametrize(
    "name, hf_count",
    [
        # exact Hugging Face checkpoint sizes (sum of p.numel() over model.parameters())
        ("llama2-7b", 6_738_415_616),
        ("llama2-13b", 13_015_864_320),
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
    ],
)
def test_llama_parameter_counts_are_exact(name, hf_count):
    assert _param_count(_graph(model_preset(name))) == hf_count


def test_tied_head_and_untied_head():
    gpt = _graph(model_preset("gpt3-1.3b"))
    emb, head = gpt.layers[0], gpt.layers[-1]
    v, h = 50257, 2048
    assert emb.params_tp == v * h and emb.params_rep == 2048 * h
    assert head.tied_weights and head.params_tp == v * h
    llama = _graph(model_preset("llama2-7b"))
    assert not any(layer.tied_weights for layer in llama.layers)
    assert llama.layers[0].params_rep == 0  # rope: no position table


# --- 3. FLOPs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, s", [("gpt3-1.3b", 2048), ("gpt3-175b", 2048), ("gpt3-2.7b", 1024)])
def test_gpt_training_flops_match_narayanan(name, s):
    model = model_preset(name)
    g = _graph(model, seq_length=s)
    B, L, h, V = 8, model.num_layers, model.hidden_size, model.vocab_size
    assert g.layers[0].flops_fwd == 0.0  # the embedding lookup does no matmul
    train = 3 * sum(layer.flops_fwd for layer in g.layers) * B
    reference = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    assert _close(train, reference, 1e-6), (train, reference)


def test_transformer_layer_flops_per_sample():
    model = _gpt_like(hidden=1024, heads=16)
    s, h = 512, 1024
    layer = _transformer_layer(model, s, flash=True)
    assert layer.flops_fwd == 24 * s * h * h + 4 * s * s * h


# --- 4. activation memory (Korthikanti et al. 2022) -------------------------------------------------

S, H, A = 2048, 1024, 16  # sequence, hidden, heads of the GPT-style test model


@pytest.fixture(scope="module")
def gpt_layer():
    return _transformer_layer(_gpt_like(hidden=H, heads=A), S, flash=False)


@pytest.fixture(scope="module")
def gpt_layer_flash():
    return _transformer_layer(_gpt_like(hidden=H, heads=A), S, flash=True)


def test_layer_activation_parts(gpt_layer):
    # 10 sbh that only SP divides (norm inputs, dropout masks), 24 sbh TP divides, 5as^2 scores
    assert gpt_layer.act_seq == 10 * S * H
    assert gpt_layer.act_split == 24 * S * H
    assert gpt_layer.act_scores == 5 * A * S * S
    assert gpt_layer.input_bytes == 2 * S * H


@pytest.mark.parametrize("b", [1, 4])
def test_activation_no_parallelism(gpt_layer, b):
    expected = S * b * H * (34 + 5 * A * S / H)
    for sp in (False, True):
        assert _close(activation_bytes(gpt_layer, 1, samples=b, recompute="none", sequence_parallel=sp), expected)


@pytest.mark.parametrize("t", [2, 4, 8])
@pytest.mark.parametrize("b", [1, 2])
def test_activation_tp_without_sp(gpt_layer, t, b):
    expected = S * b * H * (10 + 24 / t + 5 * A * S / (H * t))
    assert _close(activation_bytes(gpt_layer, t, samples=b, recompute="none", sequence_parallel=False), expected)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("b", [1, 2])
def test_activation_tp_with_sp(gpt_layer, t, b):
    expected = S * b * H * (34 / t + 5 * A * S / (H * t))
    assert _close(activation_bytes(gpt_layer, t, samples=b, recompute="none", sequence_parallel=True), expected)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_activation_selective_recompute(gpt_layer, t):
    b = 2
    with_sp = activation_bytes(gpt_layer, t, samples=b, recompute="selective", sequence_parallel=True)
    assert _close(with_sp, 34 * S * b * H / t)
    without_sp = activation_bytes(gpt_layer, t, samples=b, recompute="selective", sequence_parallel=False)
    assert _close(without_sp, S * b * H * (10 + 24 / t))


@pytest.mark.parametrize("b", [1, 3])
def test_activation_full_recompute(gpt_layer, b):
    assert _close(activation_bytes(gpt_layer, 1, samples=b, recompute="full", sequence_parallel=False), 2 * S * b * H)
    # without SP each TP rank holds the whole layer input; with SP a 1/t shard
    assert _close(activation_bytes(gpt_layer, 4, samples=b, recompute="full", sequence_parallel=False), 2 * S * b * H)
    assert _close(
        activation_bytes(gpt_layer, 4, samples=b, recompute="full", sequence_parallel=True), 2 * S * b * H / 4
    )


@pytest.mark.parametrize("t", [1, 2, 8])
def test_flash_attention_drops_the_s_squared_term(gpt_layer, gpt_layer_flash, t):
    b = 2
    assert gpt_layer_flash.act_scores == 4 * A * S  # fp32 softmax statistics per sample
    assert gpt_layer_flash.act_seq == gpt_layer.act_seq and gpt_layer_flash.act_split == gpt_layer.act_split
    flash = activation_bytes(gpt_layer_flash, t, samples=b, recompute="none", sequence_parallel=True)
    assert _close(flash, S * b * H * 34 / t + 4 * A * S * b / t)
    # selective recompute has nothing left to drop but the statistics
    assert _close(activation_bytes(gpt_layer_flash, t, samples=b, recompute="selective"), 34 * S * b * H / t)


def test_activation_without_dropout_has_no_masks():
    layer = _transformer_layer(_gpt_like(hidden=H, heads=A, dropout=0.0), S, flash=False)
    b = 1
    # Korthikanti minus the two sbh dropout masks and the a*s^2 mask + dropout output (3 a s^2 bytes)
    expected = S * b * H * (32 + 2 * A * S / H)
    assert _close(activation_bytes(layer, 1, samples=b, recompute="none", sequence_parallel=False), expected)


def test_activation_scales_with_precision():
    fp32 = _transformer_layer(_gpt_like(hidden=H, heads=A), S, flash=False, precision="fp32")
    # 16-bit tensors double, the 1-byte dropout masks (2 sbh, a s^2) do not
    assert fp32.act_seq + fp32.act_split == 2 * (34 - 2) * S * H + 2 * S * H
    assert fp32.act_scores == A * S * S * (4 + 1 + 4)


# --- 5. spec validation ------------------------------------------------------------------------------


def _spec(**overrides) -> ModelSpec:
    fields = dict(
        name="m",
        architecture="decoder",
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=512,
        vocab_size=1000,
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def test_valid_small_spec_properties():
    m = _spec(num_query_groups=2)
    assert m.head_dim == 32 and m.query_groups == 2
    assert _spec().query_groups == 4
    assert _spec(kv_channels=48).head_dim == 48
    assert ModelSpec.from_dict(m.to_dict()) == m


def test_hidden_not_divisible_by_heads():
    with pytest.raises(SpecError, match="hidden_size") as info:
        _spec(hidden_size=100, num_attention_heads=3)
    assert "num_attention_heads" in str(info.value)
    # an explicit kv_channels lifts the rule
    assert _spec(hidden_size=100, num_attention_heads=3, kv_channels=32).head_dim == 32


def test_heads_not_divisible_by_query_groups():
    with pytest.raises(SpecError, match="num_query_groups"):
        _spec(num_attention_heads=32, hidden_size=4096, num_query_groups=5)
    with pytest.raises(SpecError, match="num_query_groups"):
        _spec(num_query_groups=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", -2),
        ("num_layers", 0),
        ("num_layers", 2.0),
        ("num_layers", True),
        ("hidden_size", 0),
        ("ffn_hidden_size", -1),
        ("vocab_size", 0),
        ("max_position_embeddings", 0),
        ("num_decoder_layers", 3),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("architecture", "rnn"),
        ("normalization", "batchnorm"),
        ("position_embedding", "alibi"),
        ("name", ""),
    ],
)
def test_invalid_model_fields_name_the_field(field, value):
    with pytest.raises(SpecError) as info:
        _spec(**{field: value})
    assert f"'{field}'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_encoder_decoder_needs_decoder_layers_and_vit_image_rules():
    with pytest.raises(SpecError, match="num_decoder_layers"):
        _spec(architecture="encoder_decoder")
    with pytest.raises(SpecError, match="image_size"):
        _spec(architecture="vit", vocab_size=0, image_size=224, patch_size=15)
    assert _spec(architecture="vit", vocab_size=0, image_size=224, patch_size=16).vit_seq_length == 197


def test_training_spec_validation():
    with pytest.raises(SpecError, match="global_batch_size"):
        TrainingSpec(global_batch_size=0, seq_length=128)
    with pytest.raises(SpecError, match="seq_length"):
        TrainingSpec(global_batch_size=8, seq_length=-1)
    with pytest.raises(SpecError, match="precision"):
        TrainingSpec(global_batch_size=8, seq_length=128, precision="int8")
    assert TrainingSpec(8, 128, precision="fp32").bytes_per_value == 4
    assert TrainingSpec(8, 128, precision="fp16").bytes_per_value == 2


def test_seq_length_beyond_max_positions():
    with pytest.raises(SpecError, match="seq_length") as info:
        build_graph(model_preset("llama2-7b"), TrainingSpec(global_batch_size=8, seq_length=8192))
    assert "max_position_embeddings" in str(info.value)
    with pytest.raises(SpecError, match="seq_length"):
        build_graph(model_preset("bert-large"), TrainingSpec(global_batch_size=8, seq_length=513))
    build_graph(model_preset("bert-large"), TrainingSpec(global_batch_size=8, seq_length=512))
    # ViT's sequence comes from the image, the training seq_length does not apply
    assert build_graph(model_preset("vit-huge"), TrainingSpec(8, 100000)).tokens_per_sample == 257


def test_decoder_seq_length_beyond_max_positions():
    # Megatron asserts max_position_embeddings >= decoder_seq_length as well as >= seq_length
    with pytest.raises(SpecError, match="decoder_seq_length"):
        build_graph(
            model_preset("t5-large"), TrainingSpec(global_batch_size=8, seq_length=512, decoder_seq_length=4096)
        )


def test_from_dict_unknown_and_missing_fields():
    data = _spec().to_dict()
    data["hidden_sise"] = 128
    with pytest.raises(SpecError, match="hidden_sise"):
        ModelSpec.from_dict(data)
    with pytest.raises(SpecError, match="hidden_size"):
        ModelSpec.from_dict({"name": "x", "architecture": "decoder", "num_layers": 2})
    with pytest.raises(SpecError, match="mapping"):
        ModelSpec.from_dict(["not", "a", "mapping"])
    with pytest.raises(SpecError, match="flash"):
        TrainingSpec.from_dict({"global_batch_size": 8, "seq_length": 128, "flash": True})


def test_unknown_model_preset():
    with pytest.raises(UnknownPresetError) as info:
        model_preset("nope")
    msg = str(info.value)
    assert "nope" in msg and "llama2-7b" in msg and "gpt3-175b" in msg
    assert isinstance(info.value, SpecError)


# --- 6. loaders --------------------------------------------------------------------------------------


def test_load_model_preset_name():
    assert load_model("llama2-7b") is MODEL_PRESETS["llama2-7b"]


def test_load_model_yaml_spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "architecture: decoder\nnum_layers: 3\nhidden_size: 256\nnum_attention_heads: 8\n"
        "ffn_hidden_size: 1024\nvocab_size: 5000\nnum_query_groups: 2\ngated_mlp: true\n"
        "normalization: rmsnorm\nmax_position_embeddings: 1024\n"
    )
    m = load_model(str(path))
    assert m.name == "tiny"  # defaults to the file's stem
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.query_groups) == (3, 256, 8, 2)
    assert m.gated_mlp and m.normalization == "rmsnorm" and m.max_position_embeddings == 1024
    assert len(build_graph(m, TrainingSpec(4, 1024)).layers) == 5


def test_load_model_json_spec_keeps_its_name(tmp_path):
    spec = _spec(name="my-model", num_layers=5).to_dict()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert load_model(str(path)) == _spec(name="my-model", num_layers=5)


def test_load_model_yaml_spec_with_bad_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "architecture: decoder\nnum_layers: -1\nhidden_size: 256\nnum_attention_heads: 8\n"
        "ffn_hidden_size: 1024\nvocab_size: 5000\n"
    )
    with pytest.raises(SpecError, match="num_layers"):
        load_model(str(path))


LLAMA_CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "rope_theta": 500000.0,
}


def test_hf_llama_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_CFG))
    m = load_model(str(path))
    assert m.architecture == "decoder"
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (32, 4096, 32, 8)
    assert (m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == (14336, 128256, 8192)
    assert m.gated_mlp and m.normalization == "rmsnorm" and m.position_embedding == "rope"
    assert not m.tied_embeddings and not m.add_bias and m.dropout == 0.0
    assert m.name == tmp_path.name  # a config.json is named after its folder
    # the same hyperparameters as the llama3-8b preset
    preset = model_preset("llama3-8b")
    assert {k: v for k, v in m.to_dict().items() if k != "name"} == {
        k: v for k, v in preset.to_dict().items() if k != "name"
    }


def test_hf_llama_without_kv_heads_is_mha():
    cfg = {k: v for k, v in LLAMA_CFG.items() if k != "num_key_value_heads"}
    assert from_hf_config(cfg).query_groups == 32


def test_hf_config_in_a_folder(tmp_path):
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CFG))
    m = load_model(str(folder))
    assert m.name == "Meta-Llama-3-8B"
    assert m.num_query_groups == 8


def test_hf_gpt2_config(tmp_path):
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "n_positions": 1024,
        "vocab_size": 50257,
        "resid_pdrop": 0.1,
    }
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.name == "gpt2"
    assert (m.architecture, m.num_layers, m.hidden_size, m.num_attention_heads) == ("decoder", 12, 768, 12)
    assert (m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == (3072, 50257, 1024)
    assert m.tied_embeddings and m.add_bias and m.normalization == "layernorm"
    assert m.position_embedding == "learned" and m.dropout == 0.1 and m.query_groups == 12
    # GPT-2 small: 124,439,808 parameters in the Hugging Face checkpoint
    assert _param_count(build_graph(m, TrainingSpec(8, 1024))) == 124_439_808


def test_hf_bert_config(tmp_path):
    cfg = {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "hidden_dropout_prob": 0.1,
        "type_vocab_size": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.architecture == "encoder"
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert (m.vocab_size, m.max_position_embeddings, m.dropout) == (30522, 512, 0.1)
    assert {k: v for k, v in m.to_dict().items() if k != "name"} == {
        k: v for k, v in model_preset("bert-large").to_dict().items() if k != "name"
    }


T5_V11_LARGE = {
    "model_type": "t5",
    "architectures": ["T5ForConditionalGeneration"],
    "d_model": 1024,
    "d_ff": 2816,
    "d_kv": 64,
    "num_heads": 16,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "dropout_rate": 0.1,
    "relative_attention_num_buckets": 32,
}


def test_hf_t5_gated_gelu_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(T5_V11_LARGE))
    m = load_model(str(path))
    assert m.architecture == "encoder_decoder"
    assert (m.num_layers, m.num_decoder_layers, m.hidden_size, m.num_attention_heads) == (24, 24, 1024, 16)
    assert (m.kv_channels, m.head_dim, m.ffn_hidden_size, m.vocab_size) == (64, 64, 2816, 32128)
    assert m.gated_mlp and m.normalization == "rmsnorm" and m.position_embedding == "relative"
    assert not m.tied_embeddings and not m.add_bias
    assert m.max_position_embeddings == 512 and m.dropout == 0.1
    relu = from_hf_config({**T5_V11_LARGE, "feed_forward_proj": "relu", "tie_word_embeddings": True})
    assert not relu.gated_mlp and relu.tied_embeddings
    assert from_hf_config({k: v for k, v in T5_V11_LARGE.items() if k != "num_decoder_layers"}).num_decoder_layers == 24


def test_hf_t5_untied_parameter_count():
    # google/t5-v1_1-large: 783,150,080 parameters. Its encoder and decoder share one input
    # embedding (T5's `shared`); only the LM head is untied, so there are two V*h matrices, not three.
    m = from_hf_config(T5_V11_LARGE, name="t5-v1_1-large")
    count = _param_count(build_graph(m, TrainingSpec(8, 512)))
    assert abs(count - 783_150_080) / 783_150_080 <= 0.01, f"{count:,}"


def test_hf_vit_config(tmp_path):
    cfg = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "image_size": 384,
        "patch_size": 16,
        "num_channels": 3,
        "id2label": {str(i): f"class{i}" for i in range(10)},
    }
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.architecture == "vit"
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (12, 768, 12, 3072)
    assert (m.image_size, m.patch_size, m.num_channels, m.num_classes) == (384, 16, 3, 10)
    assert m.vit_seq_length == 24 * 24 + 1 == m.max_position_embeddings
    assert not m.tied_embeddings
    g = build_graph(m, TrainingSpec(8, 128))
    assert g.tokens_per_sample == 577 and len(g.layers) == 14
    # without id2label: ImageNet-1k's 1000 classes; ViT-B/16 at 224 has 86,567,656 parameters
    base = from_hf_config({**{k: v for k, v in cfg.items() if k != "id2label"}, "image_size": 224})
    assert base.num_classes == 1000
    assert _param_count(build_graph(base, TrainingSpec(8, 128))) == 86_567_656


def test_unsupported_hf_model_type(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mamba", "hidden_size": 768}))
    with pytest.raises(SpecError, match="mamba") as info:
        load_model(str(path))
    assert "llama" in str(info.value)


def test_hf_config_missing_required_field():
    cfg = {k: v for k, v in LLAMA_CFG.items() if k != "intermediate_size"}
    with pytest.raises(SpecError, match="intermediate_size"):
        from_hf_config(cfg)


def test_malformed_yaml_is_a_spec_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("architecture: decoder\nnum_layers: [1, 2\n  hidden: : :\n")
    with pytest.raises(SpecError, match="not valid YAML") as info:
        load_model(str(path))
    assert type(info.value).__module__.startswith("uniap")
    assert str(path) in str(info.value)


def test_malformed_json_and_non_mapping_files(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"model_type": "llama",')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_model(str(bad_json))
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_model(str(a_list))


def test_missing_file_is_named_as_such_and_a_near_miss_preset_gets_a_suggestion(tmp_path):
    missing = tmp_path / "no-such-model.yaml"
    with pytest.raises(SpecError, match="model file .*no-such-model.yaml does not exist"):
        load_model(str(missing))
    with pytest.raises(SpecError, match="model file ./nope does not exist"):
        load_model("./nope")
    with pytest.raises(UnknownPresetError) as info:
        load_model("lama2-7b")
    assert "did you mean llama2-7b" in str(info.value) and "gpt3-1.3b" in str(info.value)
    with pytest.raises(UnknownPresetError) as info:
        load_model("zzz")
    assert "did you mean" not in str(info.value)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(SpecError, match="no config.json"):
        load_model(str(empty_folder))


# --- 7. cluster --------------------------------------------------------------------------------------

CLUSTER_FIELDS = dict(
    name="c",
    num_nodes=2,
    gpus_per_node=4,
    gpu_name="X",
    gpu_memory_gib=40.0,
    peak_tflops=100.0,
    hbm_bandwidth_gbps=1000.0,
    intra_node_bandwidth_gbps=100.0,
    inter_node_bandwidth_gbps=10.0,
)


@pytest.mark.parametrize(
    "name, capacity", [("dgx-a100-80g", 79.35), ("dgx-h100", 79.11), ("dgx-h200", 139.8), ("pcie-a100-8g", 79.35)]
)
def test_cluster_presets_exist(name, capacity):
    """Capacities as PyTorch reports them (an 80 GB card is not 80 GiB)."""
    c = cluster_preset(name)
    assert c is CLUSTER_PRESETS[name] and c.name == name
    assert (c.num_nodes, c.gpus_per_node, c.num_gpus) == (1, 8, 8)
    assert c.gpu_memory_gib == capacity
    assert c.usable_memory_bytes == (capacity - c.reserved_memory_gib) * 2**30
    assert load_cluster(name) == c


def test_cluster_preset_datasheet_figures():
    assert cluster_preset("dgx-a100-80g").peak_tflops == 312.0
    assert cluster_preset("dgx-h100").peak_tflops == 989.0
    assert (
        cluster_preset("pcie-a100-8g").intra_node_bandwidth_gbps
        < cluster_preset("dgx-a100-80g").intra_node_bandwidth_gbps
    )


def test_load_cluster_reshapes():
    c = load_cluster("dgx-h100", nodes=4)
    assert (c.num_nodes, c.gpus_per_node, c.num_gpus) == (4, 8, 32)
    assert c.peak_tflops == 989.0 and c.name == "dgx-h100"
    assert CLUSTER_PRESETS["dgx-h100"].num_nodes == 1  # the preset itself is unchanged
    c2 = load_cluster("dgx-a100-80g", nodes=2, gpus_per_node=4)
    assert (c2.num_nodes, c2.gpus_per_node, c2.num_gpus) == (2, 4, 8)
    with pytest.raises(SpecError, match="--nodes"):
        load_cluster("dgx-h100", nodes=0)
    with pytest.raises(SpecError, match="--gpus-per-node"):
        load_cluster("dgx-h100", gpus_per_node=-8)


def test_load_cluster_yaml(tmp_path):
    path = tmp_path / "mycluster.yaml"
    path.write_text(
        "num_nodes: 2\ngpus_per_node: 4\ngpu_name: V100\ngpu_memory_gib: 32\n"
        "peak_tflops: 125\nhbm_bandwidth_gbps: 900\nintra_node_bandwidth_gbps: 150\n"
        "inter_node_bandwidth_gbps: 12.5\nmatmul_efficiency: 0.6\n"
    )
    c = load_cluster(str(path))
    assert c.name == "mycluster"
    assert (c.num_gpus, c.gpu_name, c.gpu_memory_gib, c.matmul_efficiency) == (8, "V100", 32, 0.6)
    assert c.reserved_memory_gib == 4.0  # default
    assert load_cluster(str(path), nodes=3).num_gpus == 12


def test_load_cluster_yaml_errors(tmp_path):
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("\n".join(f"{k}: {v}" for k, v in CLUSTER_FIELDS.items()) + "\ngpu_count: 8\n")
    with pytest.raises(SpecError, match="gpu_count"):
        load_cluster(str(unknown))
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_nodes: [2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_cluster(str(broken))


@pytest.mark.parametrize(
    "field, value",
    [
        ("gpus_per_node", 0),
        ("num_nodes", -1),
        ("num_nodes", 1.5),
        ("matmul_efficiency", 1.5),
        ("matmul_efficiency", 0.0),
        ("inter_node_efficiency", 2),
        ("gpu_memory_gib", 0),
        ("peak_tflops", -1.0),
        ("intra_node_bandwidth_gbps", 0),
        ("reserved_memory_gib", 40.0),
        ("reserved_memory_gib", 80.0),
        ("reserved_memory_gib", -1.0),
        ("collective_latency_us", -5.0),
    ],
)
def test_invalid_cluster_values_name_the_field(field, value):
    with pytest.raises(SpecError) as info:
        ClusterSpec(**{**CLUSTER_FIELDS, field: value})
    assert f"'{field}'" in str(info.value)
    with pytest.raises(SpecError, match=field):
        ClusterSpec.from_dict({**CLUSTER_FIELDS, field: value})


def test_non_numeric_cluster_value_names_the_field():
    # a YAML typo such as `collective_latency_us: fast` must be a SpecError naming the field
    with pytest.raises(SpecError, match="collective_latency_us"):
        ClusterSpec.from_dict({**CLUSTER_FIELDS, "collective_latency_us": "fast"})


def test_unknown_cluster_preset_lists_known_ones():
    for call in (lambda: cluster_preset("dgx-x200"), lambda: load_cluster("dgx-x200")):
        with pytest.raises(UnknownPresetError) as info:
            call()
        msg = str(info.value)
        assert "dgx-x200" in msg
        for known in ("dgx-a100-80g", "dgx-h100", "pcie-a100-8g"):
            assert known in msg
