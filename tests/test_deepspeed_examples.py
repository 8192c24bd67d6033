"""Training scripts as DeepSpeed users write them, run unmodified with the config uniap emits (issue 12 item 8).

- tests/ds_example_vit_pipe.py: DeepSpeedExamples' pipeline example shape with a Hugging Face ViT, its layers the
  transformers classes themselves, in uniap's PlannedPipelineModule: each stage holds the plan's layers.
- tests/ds_example_hello.py: HelloDeepSpeed's shape (a RoBERTa masked-LM from a Hugging Face config, no optimizer
  in the script): ZeRO-2 trains, and under ZeRO-3 a model whose weights exceed the persistence threshold really
  has each of them partitioned over the ranks (every rank's `ds_tensor` holds its share).
Each is planned from the model's own config.json; the user's base config brings the optimizer (uniap keeps it).
Two CPU ranks, gloo, fp32.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("deepspeed", "transformers")),
        reason="needs deepspeed and transformers (pip install 'uniap[hf]')",
    ),
]

from test_deepspeed import assert_trains, run_ds_train  # noqa: E402

from uniap.errors import EXIT_OK  # noqa: E402
from uniap.plan import Plan  # noqa: E402

HERE = Path(__file__).resolve().parent
# The user's own config: an optimizer fast enough for a few steps on one batch; uniap keeps it.
BASE = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}}, "gradient_clipping": 1.0}
RUN = ("--nodes", "1", "--gpus-per-node", "2", "--global-batch-size", "8", "--precision", "fp32")


def _config(tmp_path: Path, hf_config, *pins: str) -> tuple[Path, Path, Path]:
    """(model folder, ds_config.json, plan.json) from `uniap-deepspeed config` for the model's config.json."""
    from uniap_deepspeed.cli import main as ds_main

    model = tmp_path / "model"
    hf_config.save_pretrained(model)
    base, config, plan = tmp_path / "base.json", tmp_path / "ds_config.json", tmp_path / "plan.json"
    base.write_text(json.dumps(BASE))
    argv = ["config", "--model", str(model / "config.json"), *RUN, *pins, "--base", str(base)]
    assert ds_main([*argv, "--save-plan", str(plan), "-o", str(config)]) == EXIT_OK
    return model, config, plan


def test_vit_pipeline_script_holds_the_plans_split_and_trains(tmp_path):
    from transformers import ViTConfig

    vit = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    model, config, plan_path = _config(tmp_path, vit, "--pipeline-stages", "2", "--seq-length", "17")
    plan = Plan.load(plan_path)
    assert plan.pipeline_degree == 2
    reports = run_ds_train(
        tmp_path,
        "--model",
        str(model),
        "--plan",
        str(plan_path),
        "--deepspeed",
        "--deepspeed_config",
        str(config),
        script=HERE / "ds_example_vit_pipe.py",
    )
    counts = plan.stage_layer_counts()
    for report in reports:
        assert report["layers"].count("ViTLayer") == counts[report["stage"]], report
    assert reports[0]["layers"][0] == "ViTEmbeddings" and reports[-1]["layers"][-1] == "ViTClassifierHead"
    assert reports[-1]["micro_batches"] == plan.micro_batches
    assert_trains(reports[-1]["losses"], 6)


@pytest.mark.parametrize("stage", [2, 3])
def test_hello_deepspeed_style_zero_script_trains(tmp_path, stage):
    from transformers import RobertaConfig

    hidden = 256 if stage == 3 else 64  # ZeRO-3: weights of h*h and more, above the persistence threshold (10*h)
    roberta = RobertaConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        vocab_size=512,
        max_position_embeddings=40,
    )
    model, config, _ = _config(
        tmp_path, roberta, "--zero-stage", str(stage), "--pipeline-stages", "1", "--seq-length", "32"
    )
    reports = run_ds_train(
        tmp_path, "--model", str(model), "--deepspeed", "--deepspeed_config", str(config),
        script=HERE / "ds_example_hello.py",
    )  # fmt: skip
    threshold = json.loads(config.read_text())["zero_optimization"].get("stage3_param_persistence_threshold")
    for report in reports:
        assert report["zero_stage"] == stage and report["world_size"] == 2
        assert report["finite"] and report["losses"][-1] < report["losses"][0], report["losses"]
        if stage == 2:
            assert report["optimizer"] == "DeepSpeedZeroOptimizer" and report["partitions"] == {}
            continue
        assert report["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        partitioned = {name: (full, local) for name, (full, local) in report["partitions"].items() if full > threshold}
        assert len(partitioned) >= 10, report["partitions"]
        for name, (full, local) in partitioned.items():
            assert local == math.ceil(full / 2), (name, full, local)  # this rank's share, not the weight
