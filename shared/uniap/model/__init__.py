"""Model specs, presets, loaders and the layer graph."""

from .graph import CHAIN, SKIP, Edge, Layer, LayerGraph, Run, build_graph
from .loaders import from_hf_config, load_model
from .presets import MODEL_PRESETS, model_preset
from .spec import ModelSpec, TrainingSpec

__all__ = [
    "CHAIN",
    "SKIP",
    "Edge",
    "Layer",
    "LayerGraph",
    "Run",
    "build_graph",
    "from_hf_config",
    "load_model",
    "MODEL_PRESETS",
    "model_preset",
    "ModelSpec",
    "TrainingSpec",
]
