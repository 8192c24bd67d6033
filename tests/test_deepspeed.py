"""Tests of the DeepSpeed adapter (uniap_deepspeed): plan -> DeepSpeed config, the plan's pipeline
split imposed on a PipelineModule, the `uniap-deepspeed` command line, and real training runs.

- Config validity: for a grid of planning jobs the emitted config is parsed by DeepSpeed's own
  `DeepSpeedConfig` with the documented `mpu` interface reporting the plan's data-parallel size
  (DeepSpeedConfig consults the mpu only when torch.distributed is initialised, so the module sets
  up a one-process gloo group first).
- Real runs: `torch.distributed.run` starts 2 CPU processes (DS_ACCELERATOR=cpu, gloo) of
  tests/ds_train.py, which trains a tiny GPT with DeepSpeed's engine under the uniap config: ZeRO-3
  data parallelism, and a 2-stage pipeline with the uneven split 3,1 from `uniap evaluate --split`.
"""

from __future__ import annotations

import argparse

import copy
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

deepspeed = pytest.importorskip("deepspeed")

import deepspeed.comm as ds_dist  # noqa: E402
from deepspeed.launcher.runner import _parse_hostfile  # noqa: E402
from deepspeed.launcher.runner import parse_args as ds_launcher_args  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from deepspeed.runtime.utils import partition_uniform  # noqa: E402

from uniap.profile.runner import free_port
from uniap.cli import main as uniap_main  # noqa: E402
from uniap.errors import InfeasibleError, SpecError  # noqa: E402
from uniap.plan import Plan  # noqa: E402
from uniap_deepspeed.capability import DEEPSPEED  # noqa: E402
from uniap_deepspeed.cli import for_remote_shell  # noqa: E402
from uniap_deepspeed.cli import main as ds_main  # noqa: E402
from uniap_deepspeed.merge import merge_config
from uniap_deepspeed.config import deepspeed_config, plan_config, plan_for_deepspeed  # noqa: E402
from uniap_deepspeed.pipeline import DEFAULT_LAYER_TYPE as PIPELINE_LAYER_TYPE
from uniap_deepspeed.pipeline import (
    PlannedPipelineModule,
    _entry_name,
    entry_stages,  # noqa: E402
    parts_from_stages,
)

TESTS = Path(__file__).parent
DS_TRAIN = TESTS / "ds_train.py"
PIPE_REASON = "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"  # DeepSpeed's own assertion text
DEFAULT_LAYER_TYPE = re.compile(PIPELINE_LAYER_TYPE, re.IGNORECASE)

# The model of ds_train.py as a uniap spec: 4 decoder layers, hidden 32, 2 heads, ffn 128, vocab 64.
TINY_GPT_YAML = """\
name: tiny-gpt
architecture: decoder
num_layers: 4
hidden_size: 32
num_attention_heads: 2
ffn_hidden_size: 128
vocab_size: 64
max_position_embeddings: 16
tied_embeddings: false
dropout: 0.0
"""


def complete(planned: dict) -> dict:
    """The config uniap writes without --base: the plan's keys plus the training defaults to review."""
    return merge_config(planned, None).config


# --- helpers -----------------------------------------------------------------------------------------


class DataParallelMPU:
    """DeepSpeed's documented `mpu` interface (as Megatron's mpu provides it) for a job with no
    model parallelism: `dp` data-parallel replicas, viewed from rank 0."""

    def __init__(self, dp: int):
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def ds_world():
    """A one-process gloo group, so that DeepSpeedConfig reads the world size from the mpu (without
    one it catches the error of dist.get_rank() and takes world size 1, ignoring the mpu)."""
    if ds_dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        ds_dist.init_distributed(
            dist_backend="gloo",
            init_method=f"file://{tmp}/pg",
            rank=0,
            world_size=1,
            auto_mpi_discovery=False,
            verbose=False,
        )
        try:
            yield
        finally:
            ds_dist.destroy_process_group()


def accepted_by_deepspeed(config: dict, dp: int) -> DeepSpeedConfig:
    """Parse `config` with DeepSpeed's DeepSpeedConfig for `dp` data-parallel ranks (raises if rejected)."""
    return DeepSpeedConfig(copy.deepcopy(config), mpu=DataParallelMPU(dp))


def run_cli(capsys, main, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-gpt.yaml"
    path.write_text(TINY_GPT_YAML)
    return path


def split_plan(
    tmp_path: Path, split: str, num_layers: int = 4, gpus: int = 2, batch: int = 4, name: str = "plan.json"
) -> Plan:
    """A deepspeed-target Plan for a hand-given split (`uniap evaluate --split`), 1 GPU per stage."""
    spec = tmp_path / f"model{num_layers}.yaml"
    spec.write_text(TINY_GPT_YAML.replace("num_layers: 4", f"num_layers: {num_layers}"))
    out = tmp_path / name
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            str(spec),
            "--cluster",
            "dgx-a100-80g",
            "--gpus-per-node",
            str(gpus),
            "--global-batch-size",
            str(batch),
            "--seq-length",
            "16",
            "--precision",
            "fp32",
            "--target",
            "deepspeed",
            "--pp",
            str(len(split.split(","))),
            "--micro-batch-size",
            "1",
            "--split",
            split,
            "-o",
            str(out),
            "--force",
        ]
    )
    assert rc == 0
    return Plan.load(out)


def run_ds_train(tmp_path: Path, *args: str, nproc: int = 2, timeout: int = 300, script: Path = DS_TRAIN) -> list[dict]:
    """Run `script` (tests/ds_train.py) on `nproc` CPU ranks with torch.distributed.run; return each rank's report
    (`<out>/rank<r>.json`, --out given). On failure the whole output of the run is in the assertion message."""
    out = tmp_path / "ranks"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for attempt in range(2):  # a port picked with bind(0) can be taken before torchrun binds it
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            str(script),
            *args,
            "--out",
            str(out),
        ]
        try:
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{script.name} ran past {timeout} s\nSTDOUT:\n{exc.stdout}\nSTDERR:\n{exc.stderr}")
        output = (
            f"command: {shlex.join(cmd)}\nexit code {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
        )
        if proc.returncode != 0 and "address already in use" in output.lower() and attempt == 0:
            continue
        break
    assert proc.returncode == 0, output
    reports = []
    for rank in range(nproc):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report\n{output}"
        reports.append(json.loads(path.read_text()))
    return reports


def assert_trains(losses: list[float], steps: int) -> None:
    assert len(losses) == steps
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert losses[-1] < 0.9 * losses[0], f"the loss barely fell: {losses}"


# --- 1. config validity over many plans -------------------------------------------------------------

MODELS = ("gpt3-1.3b", "llama2-7b", "bert-large")
CLUSTERS = ((1, 2), (1, 4), (1, 8), (2, 8))
BATCHES = {16: "fp32", 128: "fp16", 512: "bf16"}  # batch -> precision (each precision gets covered)
ZERO_PINS = (None, 0, 1, 2, 3)
PP_PINS = (None, 1, 2, 4)


def check_config(plan: Plan, config: dict) -> DeepSpeedConfig:
    """Every rule the adapter promises, then DeepSpeed's own parse of the config."""
    strategies = {(lp.strategy.tp, lp.strategy.dp, lp.strategy.zero) for lp in plan.layers}
    assert len(strategies) == 1, f"DeepSpeed runs one (tp, dp, zero) for the whole engine: {strategies}"
    tp, dp, zero = strategies.pop()
    gpus = plan.cluster.num_nodes * plan.cluster.gpus_per_node
    assert tp == 1 and dp * plan.pipeline_degree == gpus
    gbs = plan.training.global_batch_size
    assert plan.micro_batch_all_replicas % dp == 0
    # the batch identity, as DeepSpeed states it, and GAS = the plan's number of micro-batches
    assert config["train_batch_size"] == gbs
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * dp == gbs
    assert config["gradient_accumulation_steps"] == plan.micro_batches
    assert config["zero_optimization"]["stage"] == zero
    if plan.pipeline_degree > 1:
        assert zero <= 1, "the pipeline engine asserts ZeRO < 2"
        checkpointing = "activation_checkpointing" in config
        assert config["pipeline"]["activation_checkpoint_interval"] == (1 if checkpointing else 0)
        assert config["zero_optimization"].get("overlap_comm", False) is False
    else:
        assert "pipeline" not in config
    u = config["uniap"]
    assert u["pipeline_stages"] == plan.pipeline_degree and u["data_parallel_size"] == dp
    assert u["transformer_layers_per_stage"] == plan.stage_layer_counts()
    assert sum(u["transformer_layers_per_stage"]) == sum(
        lp.kind in ("transformer", "cross_transformer") for lp in plan.layers
    )
    assert u["layer_stages"] == sorted(u["layer_stages"])
    assert json.loads(json.dumps(config)) == config  # plain JSON

    ds = accepted_by_deepspeed(config, dp)
    assert ds.world_size == dp
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (
        gbs,
        plan.micro_batch_all_replicas // dp,
        plan.micro_batches,
    )
    assert ds.zero_optimization_stage == zero
    precision = plan.training.precision
    assert ds.bfloat16_config.enabled == (precision == "bf16")
    assert ds.float16_config.enabled == (precision == "fp16")
    if plan.pipeline_degree > 1:
        assert ds.zero_optimization_stage <= 1
    return ds


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, cluster, batch",
    list(itertools.product(MODELS, CLUSTERS, BATCHES)),
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_config_accepted_by_deepspeed(ds_world, model, cluster, batch):
    nodes, gpus_per_node = cluster
    gpus = nodes * gpus_per_node
    outcomes = {"ok": 0, "infeasible": 0, "refused": 0}
    for zero, pp in itertools.product(ZERO_PINS, PP_PINS):
        kwargs = dict(
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            global_batch_size=batch,
            zero_stage=zero,
            pipeline_stages=pp,
            precision=BATCHES[batch],
            time_limit=60,
        )
        if pp is not None and pp > 1 and zero is not None and zero >= 2:
            with pytest.raises(SpecError, match="incompatible with pipeline parallelism"):
                plan_for_deepspeed(model, **kwargs)
            outcomes["refused"] += 1
            continue
        if pp is not None and gpus % pp:
            with pytest.raises(SpecError, match="does not divide"):
                plan_for_deepspeed(model, **kwargs)
            outcomes["refused"] += 1
            continue
        try:
            plan = plan_for_deepspeed(model, **kwargs)
        except InfeasibleError:
            # only a 7B model forced onto one pipeline stage, where DeepSpeed's model states exceed the 71.6 GiB a
            # plan may fill (75.35 usable less the 5 % kept while the allocator ratio is estimated): unsharded
            # (ZeRO-0: 16 bytes/parameter, 24 at the step) anywhere; any stage over 2 GPUs (ZeRO-3's step peaks
            # at 22/d bytes/parameter, plus the default 5e8-element buckets); fp32 ZeRO-1 over 4 GPUs (8 + 12/d
            # bytes/parameter); or unsharded on 2 GPUs whatever the pipeline (a stage's 3.4 B parameters at
            # 16-24 bytes each and its activations need 72.5 GiB)
            assert model == "llama2-7b" and (pp == 1 or (gpus == 2 and not zero)), (zero, pp)
            assert zero == 0 or gpus == 2 or (gpus, zero, BATCHES[batch]) == (4, 1, "fp32"), (zero, pp)
            outcomes["infeasible"] += 1
            continue
        assert plan.target == "deepspeed"
        if pp is not None:
            assert plan.pipeline_degree == pp
        dp = gpus // plan.pipeline_degree
        if zero is not None:
            # one replica: ZeRO has nothing to shard, unless the plan offloads (ZeRO-Offload on one GPU per stage)
            offloads = plan.uniform_strategy.offload != "none"
            assert plan.uniform_strategy.zero == (zero if dp > 1 or offloads else 0)
        check_config(plan, deepspeed_config(plan))
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 8, outcomes


def test_plan_config_is_plan_then_translate(ds_world):
    kwargs = dict(gpus_per_node=8, global_batch_size=64, zero_stage=1, pipeline_stages=2)
    config = plan_config("gpt3-1.3b", **kwargs)
    assert config == complete(deepspeed_config(plan_for_deepspeed("gpt3-1.3b", **kwargs)))
    assert config["uniap"]["pipeline_stages"] == 2 and config["zero_optimization"]["stage"] == 1
    accepted_by_deepspeed(config, config["uniap"]["data_parallel_size"])


def test_recompute_plan_config(ds_world, tmp_path):
    """A full-recompute plan: activation checkpointing section, pipeline interval 1, DeepSpeed accepts it."""
    out = tmp_path / "rc.json"
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            "gpt3-1.3b",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "16",
            "--seq-length",
            "512",
            "--target",
            "deepspeed",
            "--pp",
            "2",
            "--zero",
            "1",
            "--recompute",
            "full",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    plan = Plan.load(out)
    config = deepspeed_config(plan)
    assert config["uniap"]["activation_checkpointing"] is True
    assert config["pipeline"]["activation_checkpoint_interval"] == 1
    assert "activation_checkpointing" in config
    ds = check_config(plan, config)
    assert ds.activation_checkpointing_config.partition_activations is False


def test_deepspeed_config_rejects_a_bad_batch_identity(ds_world):
    """The check is real: DeepSpeed refuses a config whose batch sizes do not multiply out."""
    plan = plan_for_deepspeed("gpt3-1.3b", gpus_per_node=8, global_batch_size=64, pipeline_stages=1)
    config = deepspeed_config(plan)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        accepted_by_deepspeed(config, plan.uniform_strategy.dp * 2)


@pytest.mark.parametrize("zero, pp", [(2, 2), (3, 2), (2, 4), (3, 4)])
def test_incompatible_pins_quote_deepspeed(zero, pp):
    with pytest.raises(SpecError) as info:
        plan_for_deepspeed("gpt3-1.3b", gpus_per_node=8, global_batch_size=16, zero_stage=zero, pipeline_stages=pp)
    message = str(info.value)
    assert PIPE_REASON in message
    assert f"ZeRO stage {zero}" in message and f"{pp} pipeline stages" in message


def test_quoted_reason_is_deepspeeds_assertion():
    """The reason the adapter quotes is the assertion in the installed DeepSpeed's pipeline engine."""
    engine_py = Path(deepspeed.__file__).parent / "runtime" / "pipe" / "engine.py"
    assert PIPE_REASON in engine_py.read_text()
    assert PIPE_REASON in DEEPSPEED.reasons["max_zero_with_pipeline"]
    assert DEEPSPEED.max_zero_with_pipeline == 1 and DEEPSPEED.tp_degrees == (1,)


def test_deepspeed_plans_take_the_same_training_options_as_the_core():
    """One planning path: the DeepSpeed adapter sets the attention kernel and a decoder length as `uniap plan`
    does, and refuses a non-positive sequence length instead of replacing it."""
    plan = plan_for_deepspeed(
        "t5-large",
        nodes=1,
        gpus_per_node=4,
        global_batch_size=16,
        seq_length=256,
        decoder_seq_length=64,
        flash_attention=False,
        time_limit=60,
    )
    assert plan.training.decoder_seq_length == 64 and plan.training.flash_attention is False
    with pytest.raises(SpecError, match="sequence length"):
        plan_for_deepspeed("gpt3-1.3b", nodes=1, gpus_per_node=2, global_batch_size=8, seq_length=0)


def test_cli_incompatible_pins_exit_2(capsys, tmp_path):
    out = tmp_path / "ds.json"
    rc, _, err = run_cli(
        capsys,
        ds_main,
        "config",
        "--model",
        "gpt3-1.3b",
        "--gpus-per-node",
        "8",
        "--global-batch-size",
        "16",
        "--zero-stage",
        "3",
        "--pipeline-stages",
        "2",
        "-o",
        str(out),
    )
    assert rc == 2
    assert "incompatible with pipeline parallelism" in err and "Traceback" not in err
    assert not out.exists()


def test_generic_plan_with_tp_is_refused(tmp_path):
    path = tmp_path / "tp.json"
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            "gpt3-1.3b",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "16",
            "--seq-length",
            "512",
            "--target",
            "generic",
            "--tp",
            "2",
            "-o",
            str(path),
        ]
    )
    assert rc == 0
    plan = Plan.load(path)
    assert plan.target == "generic" and plan.uniform_strategy.tp == 2
    with pytest.raises(SpecError, match="not runnable by DeepSpeed") as info:
        deepspeed_config(plan)
    assert "TP2" in str(info.value) and "--target deepspeed" in str(info.value)


def test_generic_plan_with_zero3_pipeline_is_refused(tmp_path):
    path = tmp_path / "z3pp.json"
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            "gpt3-1.3b",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "16",
            "--seq-length",
            "512",
            "--target",
            "generic",
            "--pp",
            "2",
            "--zero",
            "3",
            "-o",
            str(path),
        ]
    )
    assert rc == 0
    with pytest.raises(SpecError, match="not runnable by DeepSpeed"):
        deepspeed_config(Plan.load(path))


def test_generic_plan_within_deepspeeds_limits_translates(ds_world, tmp_path):
    path = tmp_path / "generic.json"
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            "bert-large",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "32",
            "--target",
            "generic",
            "--pp",
            "2",
            "--zero",
            "1",
            "--micro-batch-size",
            "2",
            "-o",
            str(path),
        ]
    )
    assert rc == 0
    plan = Plan.load(path)
    config = deepspeed_config(plan)
    assert config["uniap"]["target"] == "generic"
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 4)
    check_config(plan, config)


def test_cli_config_on_generic_tp_plan_exit_2(capsys, tmp_path):
    path = tmp_path / "tp.json"
    assert (
        uniap_main(
            [
                "evaluate",
                "--model",
                "gpt3-1.3b",
                "--gpus-per-node",
                "8",
                "--global-batch-size",
                "16",
                "--seq-length",
                "512",
                "--tp",
                "4",
                "-o",
                str(path),
            ]
        )
        == 0
    )
    rc, _, err = run_cli(capsys, ds_main, "config", "--plan", str(path))
    assert rc == 2 and "not runnable by DeepSpeed" in err and "Traceback" not in err


# --- 2. entry_stages / parts_from_stages ------------------------------------------------------------


class Embed:
    pass


class TransformerLayer:
    pass


class Norm:
    pass


class Head:
    pass


def flags(entries) -> list[bool]:
    return [bool(DEFAULT_LAYER_TYPE.search(_entry_name(e))) for e in entries]


def stages_and_parts(plan: Plan, entries) -> tuple[list[int], list[int]]:
    stages = entry_stages(plan, flags(entries))
    return stages, parts_from_stages(stages, plan.pipeline_degree)


T = TransformerLayer


@pytest.mark.parametrize(
    "split, entries, stages, parts",
    [
        ("3,1", [Embed, T, T, T, T, Head], [0, 0, 0, 0, 1, 1], [0, 4, 6]),
        ("3,1", [Embed, T, T, T, T, Norm, Head], [0, 0, 0, 0, 1, 1, 1], [0, 4, 7]),
        ("1,3", [Embed, T, T, T, T, Norm, Head], [0, 0, 1, 1, 1, 1, 1], [0, 2, 7]),
        ("2,2", [Embed, T, T, T, T, Norm, Head], [0, 0, 0, 1, 1, 1, 1], [0, 3, 7]),
        # an entry between transformer layers goes with the next transformer layer
        ("1,3", [Embed, T, "lambda", T, T, T, Norm, Head], [0, 0, 1, 1, 1, 1, 1, 1], [0, 2, 8]),
        ("2,2", [Embed, T, "lambda", T, T, T, Norm, Head], [0, 0, 0, 0, 1, 1, 1, 1], [0, 4, 8]),
        ("2,2", [Embed, T, T, "lambda", T, T, Norm, Head], [0, 0, 0, 1, 1, 1, 1, 1], [0, 3, 8]),
        # entries before the first transformer layer go with the embedding, after the last with the head
        ("1,1,1,1", [Embed, "lambda", T, T, T, T, Norm, "lambda", Head], [0, 0, 0, 1, 2, 3, 3, 3, 3], [0, 3, 4, 5, 9]),
        ("4", [Embed, T, T, T, T, Head], [0] * 6, [0, 6]),
    ],
)
def test_entry_stages_and_parts(tmp_path, split, entries, stages, parts):
    lam = lambda x: x  # noqa: E731  (a plain function in a layer list, as PipelineModule allows)
    entries = [lam if e == "lambda" else e for e in entries]
    plan = split_plan(tmp_path, split, gpus=len(split.split(",")))
    assert plan.stage_layer_counts() == [int(c) for c in split.split(",")]
    assert stages_and_parts(plan, entries) == (stages, parts)


def test_entry_names_of_layer_specs_modules_and_functions():
    import torch.nn as nn
    from deepspeed.pipe import LayerSpec

    class LlamaDecoderLayer(nn.Module):
        pass

    class GPT2Block(nn.Module):
        pass

    class BertEncoderLayer(nn.Module):
        pass

    class EmbeddingPipe(nn.Module):
        pass

    entries = [
        LayerSpec(EmbeddingPipe),
        LayerSpec(LlamaDecoderLayer),
        GPT2Block(),
        BertEncoderLayer,
        lambda x: x,
        nn.LayerNorm(4),
        LayerSpec(nn.Linear, 4, 4),
    ]
    assert [_entry_name(e) for e in entries] == [
        "EmbeddingPipe",
        "LlamaDecoderLayer",
        "GPT2Block",
        "BertEncoderLayer",
        "function",
        "LayerNorm",
        "Linear",
    ]
    assert flags(entries) == [False, True, True, True, False, False, False]


def test_default_layer_type_and_ds_train_classes():
    """The tests use PlannedPipelineModule's default regex; ds_train.py's classes match it for the
    transformer layers only."""
    import inspect

    import ds_train

    default = inspect.signature(PlannedPipelineModule.__init__).parameters["layer_type"].default
    assert default == DEFAULT_LAYER_TYPE.pattern
    assert flags([ds_train.EmbeddingPipe, ds_train.TransformerLayerPipe, ds_train.HeadPipe, ds_train.TinyGPT]) == [
        False,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "entries, matched",
    [
        ([Embed, T, T, T, Head], 3),
        ([Embed, T, T, T, T, T, Head], 5),
        ([Embed, Norm, Head], 0),
    ],
)
def test_mismatched_layer_counts_raise(tmp_path, entries, matched):
    plan = split_plan(tmp_path, "3,1")
    with pytest.raises(SpecError) as info:
        entry_stages(plan, flags(entries))
    assert str(info.value).startswith(
        f"the plan has 4 transformer layers but {matched} entries of the layer list match the layer type"
    )
    assert "layer_type=" in str(info.value)  # the hint: how to fix it


def test_regex_matching_too_much_is_a_count_mismatch(tmp_path):
    """A class whose name merely contains 'transformer' (a wrapper here) is counted: a clear error. (Names of
    embeddings, heads and norms never match, TransformerEmbedding included.)"""

    class TransformerWrapper:
        pass

    class TransformerEmbedding:
        pass

    plan = split_plan(tmp_path, "3,1")
    with pytest.raises(SpecError, match="plan has 4 transformer layers but 5 entries"):
        entry_stages(plan, flags([TransformerWrapper, T, T, T, T, Head]))
    assert flags([TransformerEmbedding]) == [False]


@pytest.mark.parametrize(
    "stages, num_stages",
    [
        ([0, 1, 0, 1], 2),  # not contiguous
        ([1, 1, 0, 0], 2),  # decreasing
        ([0, 0, 2, 2], 3),  # stage 1 empty
        ([0, 0, 0], 2),  # last stage empty
        ([0, 1, 2], 2),  # a stage beyond the pipeline
    ],
)
def test_parts_from_bad_stages_raise(stages, num_stages):
    with pytest.raises(SpecError, match="cannot follow the plan's split") as info:
        parts_from_stages(stages, num_stages)
    assert str(stages) in str(info.value)


def test_parts_from_stages():
    assert parts_from_stages([0, 0, 0, 0, 1, 1], 2) == [0, 4, 6]
    assert parts_from_stages([0, 1, 2, 3], 4) == [0, 1, 2, 3, 4]
    assert parts_from_stages([0, 0, 0], 1) == [0, 3]


def test_planned_module_takes_stages_from_the_plan(tmp_path):
    plan = split_plan(tmp_path, "3,1")
    for kwargs in ({"num_stages": 2}, {"topology": object()}):
        with pytest.raises(SpecError, match="number of stages from the plan"):
            PlannedPipelineModule([Embed, T, T, T, T, Head], plan=plan, **kwargs)


# --- 3. real runs: DeepSpeed's engine on 2 CPU ranks -----------------------------------------------

STEPS = 6


@pytest.mark.slow
def test_real_zero3_training(tmp_path):
    plan = plan_for_deepspeed(
        str(tiny_yaml(tmp_path)),
        cluster="dgx-a100-80g",
        gpus_per_node=2,
        global_batch_size=4,
        seq_length=16,
        precision="fp32",
        zero_stage=3,
        pipeline_stages=1,
    )
    assert plan.pipeline_degree == 1 and plan.uniform_strategy.dp == 2
    config = deepspeed_config(plan)
    assert config["zero_optimization"]["stage"] == 3
    assert "optimizer" not in config  # ds_train.py passes its own torch AdamW
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(config, indent=2))

    reports = run_ds_train(tmp_path, "--config", str(config_path), "--mode", "plain", "--steps", str(STEPS))
    for r in reports:
        assert r["mode"] == "plain" and r["world_size"] == 2
        assert r["zero_stage"] == 3  # what the engine runs, not only what the file says
        assert (r["train_batch_size"], r["micro_batch_per_gpu"], r["gradient_accumulation_steps"]) == (
            config["train_batch_size"],
            config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"],
        )
        assert r["dp_world_size"] == 2
        assert r["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        assert r["zero3_managed"] == r["parameters"] > 0  # every parameter went through ZeRO-3's wrapper
        assert_trains(r["losses"], STEPS)
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], rel=1e-6)


@pytest.mark.slow
def test_real_pipeline_with_uneven_split(capsys, tmp_path):
    spec = tiny_yaml(tmp_path)
    plan_path, config_path = tmp_path / "plan.json", tmp_path / "ds_config.json"
    rc = uniap_main(
        [
            "evaluate",
            "--model",
            str(spec),
            "--cluster",
            "dgx-a100-80g",
            "--gpus-per-node",
            "2",
            "--global-batch-size",
            "4",
            "--seq-length",
            "16",
            "--precision",
            "fp32",
            "--target",
            "deepspeed",
            "--pp",
            "2",
            "--micro-batch-size",
            "1",
            "--split",
            "3,1",
            "-o",
            str(plan_path),
        ]
    )
    assert rc == 0
    # The user's optimizer, as a real job brings it: the defaults' warm-up (1000 steps) would not train in 6.
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}}}))
    rc, out, err = run_cli(
        capsys, ds_main, "config", "--plan", str(plan_path), "--base", str(base), "-o", str(config_path)
    )
    assert rc == 0, err
    plan, config = Plan.load(plan_path), json.loads(config_path.read_text())
    assert plan.stage_layer_counts() == [3, 1]
    assert config["uniap"]["transformer_layers_per_stage"] == [3, 1]
    assert config["gradient_accumulation_steps"] == plan.micro_batches == 4
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["zero_optimization"]["stage"] <= 1

    reports = run_ds_train(
        tmp_path, "--config", str(config_path), "--plan", str(plan_path), "--mode", "pipe", "--steps", str(STEPS)
    )
    # DeepSpeed's own methods would not give this split ('uniform' gives [0, 3, 6] for 6 entries)
    assert partition_uniform(6, 2) != [0, 4, 6]
    for stage, r in enumerate(reports):
        assert r["parts"] == [0, 4, 6]
        assert r["stage_id"] == stage and r["num_stages"] == 2
        assert r["gradient_accumulation_steps"] == plan.micro_batches == config["gradient_accumulation_steps"]
        assert r["zero_stage"] == config["zero_optimization"]["stage"]
        assert_trains(r["losses"], STEPS)
    assert (reports[0]["local_start"], reports[0]["local_stop"]) == (0, 4)
    assert reports[0]["local_layers"] == ["EmbeddingPipe"] + ["TransformerLayerPipe"] * 3
    assert (reports[1]["local_start"], reports[1]["local_stop"]) == (4, 6)
    assert reports[1]["local_layers"] == ["TransformerLayerPipe", "HeadPipe"]
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], rel=1e-6)  # train_batch's loss, broadcast


# --- 4. the uniap-deepspeed command line -------------------------------------------------------------

CONFIG_JOB = ["--model", "gpt3-1.3b", "--gpus-per-node", "8", "--global-batch-size", "16", "--seq-length", "512"]


def test_cli_config_writes_and_refuses_to_overwrite(capsys, tmp_path):
    out, plan_path = tmp_path / "ds_config.json", tmp_path / "plan.json"
    rc, stdout, err = run_cli(capsys, ds_main, "config", *CONFIG_JOB, "-o", str(out), "--save-plan", str(plan_path))
    assert rc == 0, err
    assert f"wrote {out}" in stdout
    config = json.loads(out.read_text())
    assert config == complete(deepspeed_config(Plan.load(plan_path)))
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns

    rc, stdout, err = run_cli(capsys, ds_main, "config", *CONFIG_JOB, "--zero-stage", "0", "-o", str(out))
    assert rc == 2
    assert "exists" in err and "--force" in err and "Traceback" not in err
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime

    # --save-plan is protected the same way (and nothing is written when it refuses)
    other = tmp_path / "other.json"
    rc, _, err = run_cli(capsys, ds_main, "config", *CONFIG_JOB, "-o", str(other), "--save-plan", str(plan_path))
    assert rc == 2 and not other.exists()

    rc, _, err = run_cli(capsys, ds_main, "config", *CONFIG_JOB, "--pipeline-stages", "2", "-o", str(out), "--force")
    assert rc == 0, err
    assert json.loads(out.read_text())["uniap"]["pipeline_stages"] == 2


def test_cli_config_prints_json(capsys):
    rc, stdout, err = run_cli(capsys, ds_main, "config", *CONFIG_JOB, "--zero-stage", "2")
    assert rc == 0, err
    config = json.loads(stdout)
    assert config["zero_optimization"]["stage"] == 2


def test_cli_config_from_plan_matches_library(capsys, tmp_path):
    plan = split_plan(tmp_path, "1,3")
    rc, stdout, err = run_cli(capsys, ds_main, "config", "--plan", str(tmp_path / "plan.json"))
    assert rc == 0, err
    assert json.loads(stdout) == complete(deepspeed_config(plan))


@pytest.fixture
def two_node_plan(tmp_path) -> Path:
    path = tmp_path / "plan2.json"
    rc = ds_main(
        [
            "config",
            "--model",
            "gpt3-1.3b",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--global-batch-size",
            "16",
            "--seq-length",
            "512",
            "--save-plan",
            str(path),
            "-o",
            str(tmp_path / "unused.json"),
        ]
    )
    assert rc == 0
    plan = Plan.load(path)
    assert (plan.cluster.num_nodes, plan.cluster.gpus_per_node) == (2, 8)
    return path


def deepspeed_command(script_text: str) -> list[str]:
    """The `deepspeed ...` command of launch.sh (continuation lines joined), split as a shell would."""
    logical = script_text.replace("\\\n", " ").splitlines()
    commands = [line for line in logical if line.strip().startswith("deepspeed ")]
    assert len(commands) == 1, script_text
    return shlex.split(commands[0])


def test_cli_launch(capsys, tmp_path, two_node_plan):
    out = tmp_path / "launch dir"
    script = "/opt/my project/train gpt.py"
    script_args = ["--data", "/data/my corpus", "--note", 'it\'s "quoted" $HOME `x`', "--lr", "3e-4"]
    rc, stdout, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(two_node_plan),
        "--hosts",
        "node-a,node-b",
        "--script",
        script,
        "--master-port",
        "29555",
        "--output-dir",
        str(out),
        "--",
        *script_args,
    )
    assert rc == 0, err
    hostfile, config_path, launch = out / "hostfile", out / "ds_config.json", out / "launch.sh"
    assert hostfile.read_text() == "node-a slots=8\nnode-b slots=8\n"
    # DeepSpeed's own hostfile parser reads it back
    assert dict(_parse_hostfile(hostfile.read_text().splitlines(keepends=True))) == {"node-a": 8, "node-b": 8}
    assert json.loads(config_path.read_text()) == complete(deepspeed_config(Plan.load(two_node_plan)))
    assert os.access(launch, os.X_OK)
    text = launch.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    syntax = subprocess.run(["bash", "-n", str(launch)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr

    argv = deepspeed_command(text)
    assert argv[0] == "deepspeed"
    # DeepSpeed's own launcher parser accepts the command line and sees the plan's topology
    parsed = ds_launcher_args(argv[1:])
    assert (parsed.hostfile, parsed.num_nodes, parsed.num_gpus) == ("$here/hostfile", 2, 8)
    assert (parsed.master_addr, parsed.master_port) == ("node-a", 29555)
    assert parsed.user_script == script
    # prepared for the shell DeepSpeed's pdsh runner hands them to on each node (the test below runs it)
    remote = [for_remote_shell(a) for a in script_args]
    assert parsed.user_args == [*remote, "--deepspeed", "--deepspeed_config", "$here/ds_config.json"]
    assert Plan.load(out / "plan.json").to_dict() == Plan.load(two_node_plan).to_dict()  # for PlannedPipelineModule


def test_cli_launch_passes_the_config_as_hugging_face_trainer_expects(capsys, tmp_path):
    """Trainer's --deepspeed takes the path itself; DeepSpeed's style (--deepspeed --deepspeed_config PATH) makes
    it fail with 'argument --deepspeed: expected one argument'. Both are checked with the parsers that read them.
    The Trainer's batch and precision arguments are added to match the config."""
    plan = tmp_path / "plan.json"
    rc, _, err = run_cli(
        capsys, ds_main, "config", "--hf", "--model", "gpt3-1.3b", "--nodes", "2", "--gpus-per-node", "8",
        "--global-batch-size", "64", "--seq-length", "512", "--save-plan", str(plan), "-o", str(tmp_path / "c.json"),
    )  # fmt: skip
    assert rc == 0, err
    out = tmp_path / "hf"
    rc, _stdout, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(plan),
        "--hosts",
        "a,b",
        "--script",
        "train.py",
        "--config-arg",
        "hf",
        "--output-dir",
        str(out),
        "--",
        "--output_dir",
        "run",
    )
    assert rc == 0, err
    config = json.loads((out / "ds_config.json").read_text())
    assert config["optimizer"]["params"]["lr"] == "auto" and config["gradient_clipping"] == "auto"
    parsed = ds_launcher_args(deepspeed_command((out / "launch.sh").read_text())[1:])
    batch = [
        "--per_device_train_batch_size",
        str(config["train_micro_batch_size_per_gpu"]),
        "--gradient_accumulation_steps",
        str(config["gradient_accumulation_steps"]),
        "--bf16",
    ]
    assert parsed.user_args == ["--output_dir", "run", *batch, "--deepspeed", "$here/ds_config.json"]
    trainer_like = argparse.ArgumentParser()  # transformers' TrainingArguments field: deepspeed: str | dict
    trainer_like.add_argument("--deepspeed", type=str)
    trainer_like.add_argument("--output_dir")
    trainer_like.add_argument("--per_device_train_batch_size", type=int)
    trainer_like.add_argument("--gradient_accumulation_steps", type=int)
    trainer_like.add_argument("--bf16", action="store_true")
    assert trainer_like.parse_args(parsed.user_args).deepspeed == "$here/ds_config.json"
    with pytest.raises(SystemExit):
        trainer_like.parse_args(["--deepspeed", "--deepspeed_config", "x.json"])
    import deepspeed

    ds_style = deepspeed.add_config_arguments(argparse.ArgumentParser())
    ns = ds_style.parse_args(["--deepspeed", "--deepspeed_config", "x.json"])
    assert ns.deepspeed is True and ns.deepspeed_config == "x.json"


def test_cli_launch_script_runs_with_its_arguments_intact(capsys, tmp_path, two_node_plan):
    """Execute launch.sh with a stand-in `deepspeed` first on PATH that records its argv: the real
    shell's word splitting keeps the script path with spaces and the quoted arguments whole."""
    out = tmp_path / "out"
    script_args = ["--name", "a b", "--q", "x'y\"z", "--empty", ""]
    rc, _, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(two_node_plan),
        "--hosts",
        "h1,h2",
        "--script",
        "my dir/train.py",
        "--output-dir",
        str(out),
        "--",
        *script_args,
    )
    assert rc == 0, err
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "deepspeed"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(os.environ['ARGV_OUT'], 'w'))\n"
    )
    recorder.chmod(0o755)
    record = tmp_path / "argv.json"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGV_OUT": str(record)}
    proc = subprocess.run(["bash", str(out / "launch.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(record.read_text())
    # The launcher runs where launch.sh was started (the script path is relative to it); the hostfile
    # and the config come from launch.sh's own folder, by absolute path.
    assert Path(seen["cwd"]).resolve() == tmp_path.resolve()
    parsed = ds_launcher_args(seen["argv"])
    assert (Path(parsed.hostfile), parsed.num_nodes, parsed.num_gpus, parsed.master_addr, parsed.master_port) == (
        (out / "hostfile").resolve(),
        2,
        8,
        "h1",
        29500,
    )
    assert parsed.user_script == "my dir/train.py"
    remote = [for_remote_shell(a) for a in script_args]
    assert parsed.user_args[:-1] == [*remote, "--deepspeed", "--deepspeed_config"]
    assert Path(parsed.user_args[-1]) == (out / "ds_config.json").resolve()


def test_cli_launch_relative_script_path_survives_the_cd(capsys, tmp_path, two_node_plan, monkeypatch):
    (tmp_path / "train.py").write_text("print('training')\n")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(two_node_plan),
        "--hosts",
        "h1,h2",
        "--script",
        "train.py",
        "--output-dir",
        "run1",
    )
    assert rc == 0, err
    text = (tmp_path / "run1" / "launch.sh").read_text()
    script = ds_launcher_args(deepspeed_command(text)[1:]).user_script
    # launch.sh does not change folder: run from where `launch` ran, the script path still resolves
    assert "cd " not in text.split("here=")[0]
    assert (tmp_path / script).exists()


@pytest.mark.parametrize("hosts", ["node-a", "node-a,node-b,node-c", "node-a,node-a", ","])
def test_cli_launch_wrong_hosts_exit_2(capsys, tmp_path, two_node_plan, hosts):
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(two_node_plan),
        "--hosts",
        hosts,
        "--script",
        "train.py",
        "--output-dir",
        str(out),
    )
    assert rc == 2
    assert "--hosts" in err and "2 node(s)" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_launch_refuses_to_overwrite(capsys, tmp_path, two_node_plan):
    out = tmp_path / "out"
    argv = ["launch", str(two_node_plan), "--hosts", "a,b", "--script", "train.py", "--output-dir", str(out)]
    assert run_cli(capsys, ds_main, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_cli(capsys, ds_main, *argv[:3], "c,d", *argv[4:])
    assert rc == 2 and "exists" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = run_cli(capsys, ds_main, *argv[:3], "c,d", *argv[4:], "--force")
    assert rc == 0, err
    assert (out / "hostfile").read_text() == "c slots=8\nd slots=8\n"


def test_cli_launch_missing_plan_exit_2(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys,
        ds_main,
        "launch",
        str(tmp_path / "nope.json"),
        "--hosts",
        "a",
        "--script",
        "train.py",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert rc == 2 and "Traceback" not in err


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_buckets_are_sized_to_the_model_and_counted_in_memory(zero):
    """Buckets follow the hidden size as Hugging Face's "auto" values do (reduce h*h, prefetch 0.9*h*h,
    persistence 10*h), not DeepSpeed's fixed defaults, and the plan's memory counts the same buffers."""
    from uniap.cluster.spec import CLUSTER_PRESETS
    from uniap.cost.model import CostModel
    from uniap.cost.strategy import Strategy
    from uniap.model.graph import TRANSFORMER, build_graph
    from uniap.model.presets import MODEL_PRESETS
    from uniap.model.spec import TrainingSpec

    plan = plan_for_deepspeed(
        "llama2-7b", gpus_per_node=8, global_batch_size=64, seq_length=2048, zero_stage=zero, pipeline_stages=1
    )
    section = deepspeed_config(plan)["zero_optimization"]
    h = 4096
    assert section["reduce_bucket_size"] == h * h
    if zero == 3:
        assert section["stage3_prefetch_bucket_size"] == int(0.9 * h * h) + int(0.9 * h * h) % 2
        assert section["stage3_param_persistence_threshold"] == 10 * h
    else:
        assert section["allgather_bucket_size"] == h * h
    training = TrainingSpec(global_batch_size=64, seq_length=2048)
    graph = build_graph(MODEL_PRESETS["llama2-7b"], training)
    layer = next(layer for layer in graph.layers if layer.kind == TRANSFORMER)
    cost = CostModel(CLUSTER_PRESETS["dgx-a100-80g"], training).layer_cost(
        layer, Strategy(1, 8, zero), 8, 1, True, DEEPSPEED.accounting
    )
    expected = {1: 3 * h * h, 2: 3 * h * h, 3: 1e9 + 1.9 * h * h}[zero] * 2
    assert cost.buffer_bytes == pytest.approx(expected)


def test_default_layer_type_finds_hugging_face_layers_and_not_their_neighbours():
    """BERT, RoBERTa and ViT name their layers <Model>Layer (transformers' modeling files); none of the
    embeddings, norms, poolers or heads around them match."""
    names = [
        "BertEmbeddings",
        "BertLayer",
        "RobertaLayer",
        "ViTLayer",
        "ViTEmbeddings",
        "LlamaDecoderLayer",
        "GPT2Block",
        "T5Block",
        "LayerNorm",
        "BertPooler",
        "LMHead",
        "ViTPatchEmbeddings",
        "RMSNormLayer",
        "TransformerLayerPipe",
        "EmbeddingPipe",
        "HeadPipe",
        "OutputLayer",
    ]
    hits = {n for n in names if DEFAULT_LAYER_TYPE.search(n)}
    assert hits == {
        "BertLayer",
        "RobertaLayer",
        "ViTLayer",
        "LlamaDecoderLayer",
        "GPT2Block",
        "T5Block",
        "TransformerLayerPipe",
    }


def test_a_layer_list_that_does_not_match_the_plan_names_what_it_saw(tmp_path):
    plan = split_plan(tmp_path, "2,2", gpus=2)
    names = ["EmbeddingPipe", "MyLayerImpl", "MyLayerImpl", "HeadPipe"]
    with pytest.raises(SpecError) as info:
        entry_stages(plan, [False, False, False, False], names)
    assert "the list: EmbeddingPipe, MyLayerImpl x2, HeadPipe" in str(info.value)


@pytest.mark.slow
def test_launch_arguments_survive_the_pdsh_runner_and_the_remote_shell(capsys, tmp_path, two_node_plan):
    """Run launch.sh for two nodes through DeepSpeed's real launcher, with stand-ins for `ssh` and `pdsh` first on
    PATH (nothing leaves the machine): pdsh's stand-in records the command it was given, and runs it through a
    shell as a node would, with the per-node launcher replaced by a recorder. The training script on the node
    gets every argument as the user wrote it: spaces, quotes, $, backquotes, backslashes, ';', '*', empty."""
    script_args = [
        "--name", "a b", "--q", "x'y\"z", "--note", 'it\'s "quoted" $HOME `x` \\n', "--glob", "*.json",
        "--sep", "a;b", "--empty", "", "--lr", "3e-4", "--dollar", "$USER",
    ]  # fmt: skip
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, ds_main, "launch", str(two_node_plan), "--hosts", "h1,h2", "--script", "train.py",
        "--output-dir", str(out), "--", *script_args,
    )  # fmt: skip
    assert rc == 0, err
    bin_dir, record = tmp_path / "bin", tmp_path / "node_argv.json"
    bin_dir.mkdir()
    node = tmp_path / "node_launcher.py"
    node.write_text("import json, os, sys\njson.dump(sys.argv[1:], open(os.environ['NODE_ARGV'], 'w'))\n")
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")  # the launcher's reachability check
    (bin_dir / "pdsh").write_text(
        f"#!{sys.executable}\n"
        "import json, os, shlex, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "json.dump(args, open(os.environ['PDSH_ARGV'], 'w'))\n"
        "words = args[args.index('-w') + 2:]\n"  # after pdsh's options and its host list: the remote command
        "command = ' '.join(words).replace('%n', '0')\n"
        "command = command.replace('-m deepspeed.launcher.launch', shlex.quote(os.environ['NODE_LAUNCHER']))\n"
        "sys.exit(subprocess.call(['sh', '-c', command]))\n"
    )
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PDSH_ARGV": str(tmp_path / "pdsh_argv.json"),
        "NODE_ARGV": str(record),
        "NODE_LAUNCHER": str(node),
        "DS_ACCELERATOR": "cpu",
    }
    proc = subprocess.run(
        ["bash", str(out / "launch.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pdsh = json.loads((tmp_path / "pdsh_argv.json").read_text())
    assert pdsh[: pdsh.index("-w") + 2][-2:] == ["-w", "h1,h2"]
    seen = json.loads(record.read_text())
    assert "--node_rank=0" in seen and "--master_addr=h1" in seen
    user = seen[seen.index("train.py") + 1 :]
    assert user[:-3] == script_args
    assert user[-3:-1] == ["--deepspeed", "--deepspeed_config"] and Path(user[-1]) == (out / "ds_config.json").resolve()
