"""Inputs that used to hang, crash or pass silently (issue 22): the search's budget, sizes far beyond any real
job, and files that are not regular files. Each is refused at once with exit 2, the field and the rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_main

from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK, SpecError
from uniap.io import MAX_INPUT_BYTES, read_text
from uniap.model.spec import FIELD_LIMITS, ModelSpec, TrainingSpec
from uniap.planner import check_search_limits
from uniap.profile import Profile
from uniap_deepspeed.cli import main as deepspeed_main

SMALL = ["--model", "gpt3-1.3b", "--nodes", "1", "--global-batch-size", "16", "--seq-length", "512"]
# Refused before any work: far less than the planner's seconds.
AT_ONCE_S = 5.0


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_a_time_limit_must_be_a_positive_number_of_seconds(capsys, value):
    rc, _, err = run_main(capsys, "plan", *SMALL, "--time-limit", value)
    assert rc == EXIT_INVALID_INPUT and "time limit must be a positive number of seconds" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_deepspeed_config_refuses_the_same_time_limits(capsys, value):
    capsys.readouterr()
    rc = deepspeed_main(["config", *SMALL, "--time-limit", value])
    assert rc == EXIT_INVALID_INPUT and "time limit" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "1", "-0.1"])
def test_a_gap_must_be_in_zero_one(capsys, value):
    rc, _, err = run_main(capsys, "plan", *SMALL, "--gap", value)
    assert rc == EXIT_INVALID_INPUT and "gap must be in [0, 1)" in err


def test_gap_zero_without_a_time_limit_is_optimal(capsys):
    rc, out, _ = run_main(capsys, "plan", *SMALL, "--gap", "0", "--json")
    assert rc == EXIT_OK and json.loads(out)["solver"]["status"] == "optimal"


@pytest.mark.parametrize(
    "flag, field", [("--nodes", "num_nodes"), ("--gpus-per-node", "gpus_per_node"), ("--global-batch-size", "")]
)
def test_sizes_beyond_any_real_job_are_refused_at_once(capsys, flag, field):
    args = [a for a in SMALL]
    if flag in args:
        i = args.index(flag)
        del args[i : i + 2]
    start = time.perf_counter()
    rc, _, err = run_main(capsys, "plan", *args, flag, "1000000000")
    assert rc == EXIT_INVALID_INPUT and "must be at most" in err and field in err
    assert time.perf_counter() - start < AT_ONCE_S


def test_a_cluster_of_too_many_gpus_is_refused(capsys):
    rc, _, err = run_main(capsys, "plan", *SMALL, "--nodes", "131072", "--gpus-per-node", "1024")
    assert rc == EXIT_INVALID_INPUT and "more than the 1,048,576 GPUs" in err


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "vocab_size"])
def test_model_fields_have_an_upper_bound(field):
    fields = dict(name="m", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=100)
    fields[field] = FIELD_LIMITS[field] + (64 if field == "hidden_size" else 1)
    with pytest.raises(SpecError, match=f"'{field}': must be at most"):
        ModelSpec(**fields, architecture="decoder", max_position_embeddings=64)
    with pytest.raises(SpecError, match="'seq_length': must be at most"):
        TrainingSpec(global_batch_size=1, seq_length=FIELD_LIMITS["seq_length"] + 1)


def test_search_limits_are_checked_as_numbers():
    check_search_limits(None, 0.0)
    check_search_limits(0.5, 0.9)
    for bad in (float("nan"), float("inf"), 0, -3, "60"):
        with pytest.raises(SpecError, match="time limit"):
            check_search_limits(bad, 1e-4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_as_the_model_is_refused_not_waited_on(capsys, tmp_path):
    fifo = tmp_path / "model.yaml"
    os.mkfifo(fifo)
    start = time.perf_counter()
    rc, _, err = run_main(capsys, "plan", "--model", str(fifo), "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and "is not a regular file" in err
    assert time.perf_counter() - start < AT_ONCE_S


def test_a_device_as_the_model_is_refused(capsys):
    rc, _, err = run_main(capsys, "plan", "--model", "/dev/zero", "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and "is not a regular file" in err


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: no disk used
    with pytest.raises(SpecError, match="reads at most"):
        read_text(big, "plan")


LLAMA = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
}
VIT = {
    "model_type": "vit",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}


@pytest.mark.parametrize(
    "base, field, value, rule",
    [
        (LLAMA, "attention_dropout", "abc", "must be a number"),
        (LLAMA, "attention_dropout", 2.0, "probability"),
        (LLAMA, "tie_word_embeddings", "false", "true or false"),  # a string "false" is not false
        (LLAMA, "num_key_value_heads", 0, "positive integer"),  # not multi-head attention
        (LLAMA, "attention_bias", 1, "true or false"),
        (VIT, "patch_size", 0, "positive integer"),
        (VIT, "id2label", 5, "a mapping of labels"),
    ],
)
def test_hugging_face_fields_of_the_wrong_type_are_named(capsys, tmp_path, base, field, value, rule):
    (tmp_path / "config.json").write_text(json.dumps({**base, field: value}))
    rc, _, err = run_main(capsys, "plan", "--model", str(tmp_path), "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and f"'{field}'" in err and rule in err


def test_deeply_nested_files_are_refused(capsys, tmp_path):
    spec = tmp_path / "deep.yaml"
    spec.write_text("x: " + "[" * 5000 + "\n")
    rc, _, err = run_main(capsys, "plan", "--model", str(spec), "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and "nests its values too deeply" in err
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 100_000)
    rc, _, err = run_main(capsys, "explain", str(plan))
    assert rc == EXIT_INVALID_INPUT and str(plan) in err


def test_a_cluster_names_its_gpu_with_a_string(capsys, tmp_path):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        "name: c\ngpu_name: 300\nnum_nodes: 1\ngpus_per_node: 8\ngpu_memory_gib: 80\npeak_tflops: 300\n"
        "hbm_bandwidth_gbps: 2000\nintra_node_bandwidth_gbps: 300\ninter_node_bandwidth_gbps: 25\n"
    )
    rc, _, err = run_main(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", str(cluster), "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and "'gpu_name': must be a non-empty string" in err


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("notes", 5, "field 'notes' must be list[str]"),
        ("time_per_iteration", "fast", "field 'time_per_iteration' must be float"),
        ("mfu", 7.5, "are not a prediction"),  # explain printed it as 750 %
        ("time_per_iteration", -1.0, "are not a prediction"),
    ],
)
@pytest.mark.parametrize("command", ["explain", "compare"])
def test_a_hand_edited_plan_is_refused_by_every_command_that_reads_it(capsys, tmp_path, field, value, said, command):
    good = tmp_path / "plan.json"
    rc, _, _ = run_main(capsys, "plan", *SMALL, "-o", str(good))
    assert rc == EXIT_OK
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**json.loads(good.read_text()), field: value}))
    args = [str(edited)] if command == "explain" else [str(good), str(edited)]
    rc, _, err = run_main(capsys, command, *args)
    assert rc == EXIT_INVALID_INPUT and said in err


def _uniap(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniap.cli", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.mark.slow
def test_a_name_the_terminal_cannot_show_is_escaped_not_a_crash(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text(
        "name: modèle\narchitecture: decoder\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
        "ffn_hidden_size: 128\nvocab_size: 100\nmax_position_embeddings: 64\n",
        encoding="utf-8",
    )
    done = _uniap(
        "plan",
        "--model",
        str(spec),
        "--nodes",
        "1",
        "--global-batch-size",
        "8",
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    assert done.returncode == EXIT_OK and "mod\\xe8le" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_output_that_cannot_be_written_is_said_not_a_bug():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "uniap.cli", "plan", *SMALL],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == EXIT_INVALID_INPUT and "cannot write the output" in done.stderr
    closed = subprocess.run(
        [sys.executable, "-m", "uniap.cli", "plan", *SMALL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == EXIT_INVALID_INPUT and "standard output is closed" in closed.stderr


def test_an_output_name_too_long_is_refused(capsys, tmp_path):
    rc, _, err = run_main(capsys, "plan", *SMALL, "-o", str(tmp_path / ("a" * 300 + ".json")))
    assert rc == EXIT_INVALID_INPUT and "File name too long" in err


def test_convert_deepspeed_needs_a_pipeline_stage(capsys, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{"train_batch_size": 16}')
    rc, _, err = run_main(capsys, "convert", "deepspeed", str(config), "--model", "gpt3-1.3b", "--pipeline-stages", "0")
    assert rc == EXIT_INVALID_INPUT and "--pipeline-stages must be at least 1" in err


def _megatron_log(path: Path, intervals: list[tuple[int, float]]) -> Path:
    """A Megatron-LM core_v0.16.1 training log: one training_log line per (iteration, ms per iteration)."""
    lines = [
        f" [2026-12-07 10:00:00] iteration {it:8d}/{100:8d} | consumed samples: {it * 16:12d} | "
        f"elapsed time per iteration (ms): {ms:.1f} | learning rate: 1.0E-04 | global batch size: {16:5d} | "
        f"loss scale: 1.0 | number of skipped iterations: {0:3d} | number of nan iterations: {0:3d} |"
        for it, ms in intervals
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def megatron_plan(capsys, tmp_path) -> Path:
    plan = tmp_path / "plan.json"
    rc, _, err = run_main(capsys, "plan", *SMALL, "--target", "megatron", "--cluster", "dgx-h100", "-o", str(plan))
    assert rc == EXIT_OK, err
    return plan


def test_calibrate_refuses_a_log_of_warm_up_only(capsys, tmp_path, megatron_plan):
    log = _megatron_log(tmp_path / "train.log", [(1, 900.0), (2, 300.0)])
    rc, _, err = run_main(capsys, "calibrate", "--log", str(log), "--plan", str(megatron_plan), "--json")
    assert rc == EXIT_INVALID_INPUT and "only warm-up iterations" in err


def test_calibrate_refuses_a_log_of_another_framework(capsys, tmp_path, megatron_plan):
    log = tmp_path / "ds.log"
    log.write_text("\n".join(f"steps: {i} loss: 2.0000 iter time (s): 0.300 samples/sec: 53.333" for i in range(1, 9)))
    rc, _, err = run_main(capsys, "calibrate", "--log", str(log), "--plan", str(megatron_plan), "--json")
    assert rc == EXIT_INVALID_INPUT and "is a deepspeed log, but" in err


def test_calibrate_refuses_a_profile_of_other_gpus(capsys, tmp_path, megatron_plan):
    log = _megatron_log(tmp_path / "train.log", [(1, 900.0), (2, 300.0), (10, 100.0), (20, 100.0)])
    profile = tmp_path / "a100.json"
    Profile(device="NVIDIA A100-SXM4-80GB", runtime="test").save(profile)
    rc, _, err = run_main(
        capsys, "calibrate", "--log", str(log), "--plan", str(megatron_plan), "--profile", str(profile), "--json"
    )
    assert rc == EXIT_INVALID_INPUT and "different GPUs" in err and "A100" in err and "H100" in err


def test_a_mixture_of_experts_config_is_not_planned_as_dense(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "model_type": "mistral", "num_local_experts": 8}))
    rc, _, err = run_main(capsys, "plan", "--model", str(tmp_path), "--nodes", "1", "--global-batch-size", "8")
    assert rc == EXIT_INVALID_INPUT and "mixture-of-experts" in err and "num_local_experts" in err


def test_a_vit_is_not_labelled_with_a_sequence_it_does_not_run(capsys):
    rc, _, err = run_main(
        capsys, "plan", "--model", "vit-huge", "--nodes", "1", "--global-batch-size", "8", "--seq-length", "4096"
    )
    assert rc == EXIT_INVALID_INPUT and "a ViT's sequence is its 256 patches plus the class token (257)" in err


@pytest.mark.parametrize("edit", ["truncated layers", "more nodes"])
def test_a_plan_that_does_not_hold_together_is_refused_by_the_adapters(capsys, tmp_path, edit):
    from uniap_megatron.cli import main as megatron_main

    good = tmp_path / "plan.json"
    rc, _, err = run_main(capsys, "plan", *SMALL, "--target", "megatron", "-o", str(good))
    assert rc == EXIT_OK, err
    data = json.loads(good.read_text())
    if edit == "truncated layers":
        data["layers"] = data["layers"][:-3]
    else:
        data["cluster"]["num_nodes"] = 4
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    capsys.readouterr()
    assert megatron_main(["args", str(edited)]) == EXIT_INVALID_INPUT
    err = capsys.readouterr().err
    assert "does not hold together" in err or "corrupt plan" in err
    assert run_main(capsys, "evaluate", "--plan", str(edited))[0] == EXIT_INVALID_INPUT


def test_an_abbreviated_megatron_flag_is_refused_as_megatron_would(capsys, tmp_path):
    script = tmp_path / "train.sh"
    script.write_text(
        "#!/bin/bash\ntorchrun --nproc-per-node 8 pretrain_gpt.py --num-layers 32 --hidden-size 4096 "
        "--num-attention-heads 32 --seq-length 4096 --max-position-embeddings 4096 --global-batch-size 512 "
        "--micro-batch-size 1 --bf16 --tensor-model-parallel 4\n"
    )
    rc, _, err = run_main(capsys, "convert", "megatron", str(script))
    assert rc == EXIT_INVALID_INPUT and "takes no abbreviations" in err and "--tensor-model-parallel-size" in err
    assert [p.name for p in tmp_path.iterdir()] == ["train.sh"]
