"""The plan merged into a user's DeepSpeed config (`--base`): everything of the user's kept except the keys a
plan decides, each change reported; without a base, a complete config whose training defaults are named; and
a real DeepSpeed run (2 CPU ranks) whose script passes no optimizer, with the merged ZeRO-2 config."""

from __future__ import annotations

import json

import pytest
from test_deepspeed import run_ds_train, tiny_yaml

from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK
from uniap_deepspeed.cli import main as ds_main
from uniap_deepspeed.merge import DEFAULT_TRAINING, base_job, merge_config

JOB = ["--model", "gpt3-1.3b", "--gpus-per-node", "8", "--seq-length", "512"]
USER = {
    "train_batch_size": 64,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    "gradient_clipping": 0.5,
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "fp16": {"enabled": True, "loss_scale_window": 500},
    "steps_per_print": 1,
    "comms_logger": {"enabled": True},
    "checkpoint": {"tag_validation": "Warn"},
    "a_key_uniap_does_not_know": [1, 2, 3],
}
PLANNED = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 500000000},
    "steps_per_print": 10,
    "bf16": {"enabled": True},
    "uniap": {"pipeline_stages": 1},
}


def test_the_users_keys_stay_and_the_plans_keys_are_set_with_reasons():
    merged = merge_config(PLANNED, USER)
    c = merged.config
    for key in (
        "optimizer",
        "scheduler",
        "gradient_clipping",
        "comms_logger",
        "checkpoint",
        "a_key_uniap_does_not_know",
    ):
        assert c[key] == USER[key], key
    assert c["steps_per_print"] == 1  # logging: the user's
    assert c["zero_optimization"] == PLANNED["zero_optimization"]
    assert c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False, "loss_scale_window": 500}
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (8, 1)
    changed = dict(merged.changes)
    assert (
        "stage 2 -> 1" in changed["zero_optimization"] and "dropped offload_optimizer" in changed["zero_optimization"]
    )
    assert "train_batch_size" not in changed  # the same value
    assert set(changed) == {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "zero_optimization",
        "bf16",
        "fp16",
    }
    assert merged.defaults == []
    assert USER["zero_optimization"]["stage"] == 2  # the user's dict is not modified


def test_without_a_base_the_config_is_complete_and_says_what_to_review():
    merged = merge_config(PLANNED, None)
    assert {k: merged.config[k] for k in DEFAULT_TRAINING} == DEFAULT_TRAINING
    assert merged.defaults == ["optimizer", "scheduler", "gradient_clipping"]
    assert "defaults to review" in merged.report_lines()[-1]


def test_the_base_gives_the_job_its_batch_and_precision():
    assert base_job(USER) == {"global_batch_size": 64, "precision": "fp16"}
    assert base_job({"train_batch_size": "auto", "bf16": {"enabled": "auto"}}) == {}


def test_cli_base_keeps_the_users_config_and_reports_each_change(capsys, tmp_path):
    base, out = tmp_path / "ds_config.json", tmp_path / "merged.json"
    base.write_text(json.dumps(USER))
    original = base.read_bytes()
    rc = ds_main(["config", *JOB, "--base", str(base), "-o", str(out)])
    _stdout, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    merged = json.loads(out.read_text())
    assert merged["train_batch_size"] == 64 and merged["fp16"]["enabled"] is True  # the job is the base's
    assert merged["optimizer"] == USER["optimizer"] and merged["a_key_uniap_does_not_know"] == [1, 2, 3]
    assert "uniap-deepspeed: zero_optimization:" in err and "dropped offload_optimizer" in err
    assert base.read_bytes() == original  # the user's file is untouched


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "cannot read DeepSpeed config file"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_cli_base_errors_name_the_file(capsys, tmp_path, content, words):
    base = tmp_path / "base.json"
    if content is not None:
        base.write_text(content)
    rc = ds_main(["config", *JOB, "--base", str(base)])
    err = capsys.readouterr().err
    assert rc == EXIT_INVALID_INPUT and words in err and str(base) in err


def test_plan_config_is_importable_from_the_package_and_takes_a_base(tmp_path):
    from uniap_deepspeed import plan_config

    config = plan_config("gpt3-1.3b", base=USER, gpus_per_node=8, seq_length=512)
    assert config["optimizer"] == USER["optimizer"] and config["train_batch_size"] == 64
    path = tmp_path / "base.json"
    path.write_text(json.dumps(USER))
    assert plan_config("gpt3-1.3b", base=path, gpus_per_node=8, seq_length=512) == config


@pytest.mark.slow
def test_real_training_with_a_merged_zero2_config_and_no_optimizer_in_the_script(tmp_path):
    """The issue's failure ('zero stage 2 requires an optimizer'): the merged config carries the user's
    optimizer, scheduler and clipping, so a script that passes none trains."""
    from uniap_deepspeed import plan_config

    base = {
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 1},
        },
        "gradient_clipping": 1.0,
        "wall_clock_breakdown": False,
    }
    config = plan_config(
        str(tiny_yaml(tmp_path)),
        base=base,
        cluster="dgx-a100-80g",
        gpus_per_node=2,
        global_batch_size=4,
        seq_length=16,
        precision="fp32",
        zero_stage=2,
        pipeline_stages=1,
    )
    assert config["zero_optimization"]["stage"] == 2 and config["optimizer"] == base["optimizer"]
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    reports = run_ds_train(tmp_path, "--config", str(path), "--mode", "plain", "--steps", "6")
    for r in reports:
        assert r["zero_stage"] == 2 and r["optimizer"] == "DeepSpeedZeroOptimizer"
        assert r["finite"] and r["losses"][-1] < r["losses"][0]


NO_REPLICA_JOB = ("--model", "gpt3-1.3b", "--nodes", "1", "--gpus-per-node", "2", "--global-batch-size", "8")


def test_a_pin_that_changes_nothing_is_reported_with_its_reason(capsys, tmp_path):
    """Issue 12: '--zero-stage 1 with one data-parallel replica is dropped silently'."""
    out = tmp_path / "c.json"
    rc = ds_main(["config", *NO_REPLICA_JOB, "--zero-stage", "1", "--pipeline-stages", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == EXIT_OK, err
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 0
    assert "note: ZeRO stage 1 was pinned" in err and "data parallel 1" in err and "nothing to shard" in err
    rc = ds_main(["config", *JOB, "--zero-stage", "1", "-o", str(tmp_path / "d.json")])
    err = capsys.readouterr().err
    assert rc == EXIT_OK and "was pinned" not in err  # 8 replicas: the pin does something


def test_bf16_pipeline_accumulation_is_stated_plainly(capsys, tmp_path):
    out = tmp_path / "c.json"
    rc = ds_main(["config", *NO_REPLICA_JOB, "--pipeline-stages", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == EXIT_OK and json.loads(out.read_text())["gradient_accumulation_steps"] > 1
    assert "in bf16 (DeepSpeed warns" in err
    assert "with --zero-stage 1 --offload none uniap sets it and prices its cost" in err
    assert "data_types" not in json.loads(out.read_text())
    rc = ds_main(["config", *NO_REPLICA_JOB, "--pipeline-stages", "2", "--precision", "fp32"])
    assert rc == EXIT_OK and "in bf16" not in capsys.readouterr().err


def test_an_unaligned_vocabulary_is_named_with_the_padding_that_fixes_it(capsys, tmp_path):
    rc = ds_main(["config", *JOB, "-o", str(tmp_path / "a.json")])  # gpt3-1.3b: GPT-2's 50,257 tokens
    err = capsys.readouterr().err
    assert rc == EXIT_OK and "vocabulary of 50,257 tokens is not a multiple of 8" in err and "50,304" in err
    rc = ds_main(["config", *JOB, "--model", "llama2-7b", "-o", str(tmp_path / "b.json")])
    assert rc == EXIT_OK and "vocabulary" not in capsys.readouterr().err


@pytest.mark.slow
def test_real_bf16_pipeline_with_zero1_accumulates_in_fp32(tmp_path):
    """Issue 12 item 5: a bf16 pipeline with ZeRO-1 gets data_types.grad_accum_dtype fp32, and DeepSpeed runs it as
    the accounting prices it (BF16_Optimizer, fp32 accumulation buffers): 2 stages x 2 replicas on 4 CPU ranks."""
    from uniap_deepspeed.config import deepspeed_config, plan_for_deepspeed

    plan = plan_for_deepspeed(
        str(tiny_yaml(tmp_path)),
        cluster="dgx-a100-80g",
        gpus_per_node=4,
        global_batch_size=8,
        seq_length=16,
        precision="bf16",
        zero_stage=1,
        pipeline_stages=2,
    )
    assert plan.pipeline_degree == 2 and plan.uniform_strategy.dp == 2 and plan.uniform_strategy.zero == 1
    plan_path, config_path = tmp_path / "plan.json", tmp_path / "ds_config.json"
    plan.save(plan_path)
    base = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}}}
    config = merge_config(deepspeed_config(plan), base).config
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    config_path.write_text(json.dumps(config))
    reports = run_ds_train(
        tmp_path, "--config", str(config_path), "--plan", str(plan_path), "--mode", "pipe", "--steps", "6", nproc=4
    )
    for r in reports:
        assert r["optimizer"] == "BF16_Optimizer" and r["zero_stage"] == 1 and r["dp"] == 2
        assert r["finite"] and r["losses"][-1] < r["losses"][0]


def test_a_base_accumulation_dtype_the_plan_does_not_price_is_dropped():
    merged = merge_config(PLANNED, {**USER, "data_types": {"grad_accum_dtype": "fp32", "other": 1}})
    assert merged.config["data_types"] == {"other": 1}
    assert any(key == "data_types" and "dropped grad_accum_dtype" in why for key, why in merged.changes)
