"""Fixtures every test file may use; the folder's helper modules (megatron_lm, megatron_plans, processes, sweep)
become importable."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The smallest decoder the profilers and training runs build quickly on a CPU: 2 layers, hidden 64, 4 heads.
TINY_DECODER_YAML = """\
name: tiny
architecture: decoder
num_layers: 2
hidden_size: 64
num_attention_heads: 4
ffn_hidden_size: 128
vocab_size: 100
max_position_embeddings: 32
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A model spec file of the tiny decoder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_DECODER_YAML)
    return path
