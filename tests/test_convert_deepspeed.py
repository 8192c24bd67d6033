"""`uniap convert deepspeed` (issue 13 item 2): a DeepSpeed job's config priced as it is, planned, and the plan
merged into a copy beside it; the user's keys kept, DeepSpeed's own DeepSpeedConfig accepts the result."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")
from test_deepspeed import accepted_by_deepspeed, ds_world, run_cli  # noqa: F401  (ds_world: a fixture)

from uniap.cli import main as uniap_main
from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK

USER = {
    "train_batch_size": 256,
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}},
    "bf16": {"enabled": True},
    "steps_per_print": 50,
    "checkpoint": {"tag_validation": "Warn"},
}
LAUNCH = """#!/bin/bash
# two nodes of eight GPUs, DeepSpeed's launcher
deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 \\
    train.py --deepspeed --deepspeed_config ds_config.json --epochs 1
"""


def convert(capsys, tmp_path, config: dict, *options: str):
    path, launch = tmp_path / "ds_config.json", tmp_path / "launch.sh"
    path.write_text(json.dumps(config))
    launch.write_text(LAUNCH)
    rc, out, err = run_cli(
        capsys, uniap_main, "convert", "deepspeed", str(path), "--model", "llama2-7b", "--launch", str(launch),
        "--seq-length", "2048", "--json", *options,
    )  # fmt: skip
    return rc, (json.loads(out) if rc == EXIT_OK else None), err, path


def test_config_is_priced_planned_and_merged_beside_the_original(capsys, tmp_path, ds_world):  # noqa: F811
    rc, result, err, path = convert(capsys, tmp_path, USER)
    assert rc == EXIT_OK, err
    before, after = result["before"], result["after"]
    assert (before["zero"], before["micro_batch_size"], before["dp"], before["micro_batches"]) == (3, 2, 16, 8)
    assert result["speedup"] >= 1.0 and after["fits"]
    assert json.loads(path.read_text()) == USER  # the original untouched
    converted = json.loads((tmp_path / "ds_config.uniap.json").read_text())
    for key in ("optimizer", "scheduler", "steps_per_print", "checkpoint"):
        assert converted[key] == USER[key], key
    assert converted["train_batch_size"] == 256 and converted["zero_optimization"]["stage"] == after["zero"]
    accepted_by_deepspeed(converted, dp=after["dp"])
    assert any(change.startswith("zero_optimization") for change in result["changes"]) or after["zero"] == 3


def test_a_config_with_no_precision_enabled_stays_fp32(capsys, tmp_path):
    """DeepSpeed trains in fp32 unless bf16 or fp16 is enabled; a disabled section must not turn it on."""
    rc, _, err, _ = convert(capsys, tmp_path, {**USER, "bf16": {"enabled": False}})
    assert rc == EXIT_OK, err
    converted = json.loads((tmp_path / "ds_config.uniap.json").read_text())
    assert converted["bf16"] == {"enabled": False} and not converted.get("fp16", {}).get("enabled")


def test_keep_holds_the_zero_stage(capsys, tmp_path):
    rc, result, err, _ = convert(capsys, tmp_path, USER, "--keep", "zero")
    assert rc == EXIT_OK, err
    assert result["after"]["zero"] == 3


@pytest.mark.parametrize(
    "config, words",
    [
        ({**USER, "gradient_accumulation_steps": 3}, "does not hold for 16 data-parallel ranks"),
        ({**USER, "train_batch_size": "auto"}, "train_batch_size is 'auto'"),
    ],
)
def test_a_config_that_does_not_hold_is_refused_by_name(capsys, tmp_path, config, words):
    rc, _, err, path = convert(capsys, tmp_path, config)
    assert rc == EXIT_INVALID_INPUT and words in err
    assert not (tmp_path / "ds_config.uniap.json").exists()


@pytest.mark.usefixtures("ds_world")
def test_offloading_is_priced_as_the_config_has_it_and_mics_is_refused(capsys, tmp_path):
    """Issue 12 item 4: a ZeRO-2 job with its optimizer in CPU memory is priced so (its GPUs hold the bf16 weights
    alone); MiCS, which DeepSpeed 0.19 removed, is named; "--keep zero" keeps the stage and its offloading."""
    offloaded = {**USER, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    rc, result, err, _ = convert(capsys, tmp_path, offloaded, "--keep", "zero")
    assert rc == EXIT_OK, err
    before, after = result["before"], result["after"]
    assert (before["zero"], before["offload"]) == (2, "optimizer") == (after["zero"], after["offload"])
    converted = json.loads((tmp_path / "ds_config.uniap.json").read_text())
    assert converted["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    accepted_by_deepspeed(converted, dp=after["dp"])
    plain = {**USER, "zero_optimization": {"stage": 2}}
    rc, result, err, _ = convert(capsys, tmp_path, plain, "--keep", "zero", "--force")
    assert rc == EXIT_OK, err
    assert result["before"]["peak_memory_bytes"] > before["peak_memory_bytes"]  # the states the host took
    mics = {**USER, "zero_optimization": {"stage": 3, "mics_shard_size": 8}}
    rc, result, err, _ = convert(capsys, tmp_path, mics, "--force")
    assert rc == EXIT_INVALID_INPUT and "MiCS was removed in DeepSpeed 0.19" in err and "Traceback" not in err
