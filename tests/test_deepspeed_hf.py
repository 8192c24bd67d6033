"""Hugging Face Trainer jobs: `uniap-deepspeed config --hf` and `launch --config-arg hf` (issue 12).

The config leaves "auto" where the Trainer fills values from its own arguments (optimizer, scheduler, clipping)
and keeps the plan's batch and precision as numbers, which the Trainer checks; the launch adds the Trainer
arguments they need. A real run trains a tiny transformers GPT-2 through Trainer and DeepSpeed on 2 CPU ranks
with what uniap wrote, launched by the launch.sh it wrote."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from processes import child_env
from test_deepspeed import run_cli

from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK, SpecError
from uniap.profile.runner import free_port
from uniap_deepspeed import plan_config
from uniap_deepspeed.cli import main as ds_main
from uniap_deepspeed.cli import with_trainer_arguments
from uniap_deepspeed.merge import HF_AUTO, HF_TRAINING, merge_config, trainer_arguments

HERE = Path(__file__).resolve().parent
JOB = ("--model", "gpt3-1.3b", "--nodes", "1", "--gpus-per-node", "8", "--global-batch-size", "64")
PLANNED = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "zero_optimization": {"stage": 1},
    "bf16": {"enabled": True},
}


def test_hf_config_leaves_the_trainers_values_auto_and_keeps_the_plans():
    merged = merge_config(PLANNED, None, hf=True)
    config = merged.config
    assert {k: config[k] for k in HF_TRAINING} == HF_TRAINING
    assert config["optimizer"]["params"]["lr"] == HF_AUTO and config["gradient_clipping"] == HF_AUTO
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 4)
    assert config["bf16"] == {"enabled": True} and merged.defaults == []
    assert trainer_arguments(config) == [
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "4",
        "--bf16",
    ]


def test_a_base_keeps_its_own_training_sections_under_hf():
    base = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "gradient_clipping": 0.5}
    config = merge_config(PLANNED, base, hf=True).config
    assert config["optimizer"] == base["optimizer"] and config["gradient_clipping"] == 0.5
    assert "scheduler" not in config


@pytest.mark.parametrize(
    "script_args, expected",
    [
        (["--output_dir", "o"], ["--output_dir", "o", "--per_device_train_batch_size", "2", "--bf16"]),
        (["--per_device_train_batch_size=2", "--bf16"], ["--per_device_train_batch_size=2", "--bf16"]),
        (["--per_device_train_batch_size", "2"], ["--per_device_train_batch_size", "2", "--bf16"]),
        (["--fp16", "False"], ["--fp16", "False", "--per_device_train_batch_size", "2", "--bf16"]),
    ],
)
def test_trainer_arguments_are_added_where_the_script_has_none(script_args, expected):
    assert with_trainer_arguments(script_args, ["--per_device_train_batch_size", "2", "--bf16"]) == expected


@pytest.mark.parametrize(
    "script_args, words",
    [
        (["--per_device_train_batch_size", "8"], "pass --per_device_train_batch_size 8, the plan's config needs 2"),
        (["--per_device_train_batch_size=8"], "pass --per_device_train_batch_size 8"),
        (["--fp16"], "pass --fp16, the plan trains in bf16"),
    ],
)
def test_trainer_arguments_that_contradict_the_plan_are_refused(script_args, words):
    with pytest.raises(SpecError, match=words):
        with_trainer_arguments(script_args, ["--per_device_train_batch_size", "2", "--bf16"])


def test_cli_config_hf_plans_one_stage_and_prints_the_trainer_arguments(capsys, tmp_path):
    out, plan = tmp_path / "ds.json", tmp_path / "plan.json"
    rc, stdout, err = run_cli(capsys, ds_main, "config", *JOB, "--hf", "-o", str(out), "--save-plan", str(plan))
    assert rc == EXIT_OK, err
    config = json.loads(out.read_text())
    assert config["uniap"]["pipeline_stages"] == 1 and config["scheduler"]["params"]["total_num_steps"] == HF_AUTO
    assert "pass the Trainer --per_device_train_batch_size" in err and "defaults to review" not in err
    assert config == plan_config("gpt3-1.3b", hf=True, nodes=1, gpus_per_node=8, global_batch_size=64)


def test_cli_config_hf_refuses_a_pipeline(capsys, tmp_path):
    rc, _, err = run_cli(capsys, ds_main, "config", *JOB, "--hf", "--pipeline-stages", "2")
    assert rc == EXIT_INVALID_INPUT and "no DeepSpeed pipeline engine" in err and "--pipeline-stages" in err
    plan = tmp_path / "plan.json"
    rc, _, err = run_cli(capsys, ds_main, "config", *JOB, "--pipeline-stages", "2", "--save-plan", str(plan))
    assert rc == EXIT_OK, err
    for argv in (
        ("config", "--plan", str(plan), "--hf"),
        (
            "launch",
            str(plan),
            "--hosts",
            "a",
            "--script",
            "t.py",
            "--config-arg",
            "hf",
            "--output-dir",
            str(tmp_path / "l"),
        ),
    ):
        rc, _, err = run_cli(capsys, ds_main, *argv)
        assert rc == EXIT_INVALID_INPUT and "2 pipeline stages" in err and "PlannedPipelineModule" in err


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "accelerate")),
    reason="needs transformers and accelerate (pip install 'uniap[hf]')",
)
def test_real_trainer_run_with_the_config_and_launch_script_uniap_writes(capsys, tmp_path):
    """A tiny GPT-2 (transformers) through Trainer + DeepSpeed on 2 CPU ranks: planned from its config.json,
    launched by launch.sh (DeepSpeed's launcher, one node: no ssh), the Trainer's values filled into "auto",
    the plan's micro-batch and accumulation the engine's, and the loss falls."""
    from transformers import GPT2Config

    model_dir = tmp_path / "model"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64).save_pretrained(model_dir)
    plan = tmp_path / "plan.json"
    rc, _, err = run_cli(
        capsys, ds_main, "config", "--hf", "--model", str(model_dir / "config.json"), "--nodes", "1",
        "--gpus-per-node", "2", "--global-batch-size", "8", "--seq-length", "32", "--precision", "fp32",
        "--save-plan", str(plan), "-o", str(tmp_path / "unused.json"),
    )  # fmt: skip
    assert rc == EXIT_OK, err
    run, output = tmp_path / "run", tmp_path / "trainer_out"
    rc, _, err = run_cli(
        capsys, ds_main, "launch", str(plan), "--hosts", "localhost", "--script", str(HERE / "hf_train.py"),
        "--config-arg", "hf", "--master-port", str(free_port()), "--output-dir", str(run), "--",
        "--model_dir", str(model_dir), "--output_dir", str(output), "--use_cpu", "--max_steps", "8",
        "--learning_rate", "3e-3", "--max_grad_norm", "0.5", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--seed", "0",
    )  # fmt: skip
    assert rc == EXIT_OK, err
    proc = subprocess.run(
        ["bash", str(run / "launch.sh")],
        cwd=tmp_path,
        env=child_env(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    config = json.loads((run / "ds_config.json").read_text())
    assert (report["micro_batch"], report["accumulation"], report["world_size"]) == (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
        2,
    )
    assert report["zero_stage"] == config["zero_optimization"]["stage"]
    assert report["gradient_clipping"] == 0.5  # "auto", filled from --max_grad_norm
    assert report["finite"] and len(report["losses"]) == 8 and report["losses"][-1] < report["losses"][0]
