"""The --auto-parallel plugin (uniap_megatron.plugin) against argparse and megatron-core only.

Megatron-LM's training package is not installable here, so `megatron_parser()` rebuilds the part of its
parser the hook touches with the exact flags, dests and defaults of core_v0.16.1 (frameworks.md 1.2),
allow_abbrev=False as Megatron has it. The rewritten args are then checked against megatron-core's own
TransformerConfig validation (heads % TP, SP needs TP > 1, PP needs a pipeline dtype, recompute rules,
the pipeline split) and the batch arithmetic Megatron asserts later.

Every job is a tiny GPT (4 layers, hidden 64) on 2-4 GPUs: each plan takes well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
from megatron_argv import TINY_JOB_ARGV
from uniap.errors import InfeasibleError, SpecError, UniapError
from uniap.cost.strategy import Pins
from uniap.plan import Plan

from uniap_megatron import plugin
from uniap_megatron.args import megatron_launch
from uniap_megatron.flags import PLAN_FLAGS
from uniap_megatron.merge import merge_plan, plan_settings
from uniap_megatron.planning import plan_megatron
from uniap_megatron.plugin import auto_parallel_args, chain_providers, install, plan_file_path, rewrite_args


def megatron_parser() -> argparse.ArgumentParser:
    """The flags the hook reads or writes, spelled, typed and defaulted as Megatron-LM core_v0.16.1."""
    p = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    g = p.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-layout", type=str, default=None)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--use-torch-fsdp2", action="store_true")
    g.add_argument("--use-megatron-fsdp", action="store_true")
    g.add_argument(
        "--data-parallel-sharding-strategy",
        type=str,
        default="no_shard",
        choices=["no_shard", "optim", "optim_grads", "optim_grads_params"],
    )
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion")
    g.add_argument("--local-rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")))
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--recompute-granularity", type=str, default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", type=str, default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--cpu-offloading-num-layers", type=int, default=0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g = p.add_argument_group("transformer engine")
    g.add_argument("--fp8-format", dest="fp8", default=None, choices=["e4m3", "hybrid"])
    g.add_argument("--fp8-recipe", default="delayed", choices=["tensorwise", "delayed", "mxfp8", "blockwise", "custom"])
    g.add_argument("--tp-comm-overlap", action="store_true")
    g.add_argument("--fp8-param-gather", action="store_true")
    g.add_argument("--fp4-format", dest="fp4", default=None, choices=["e2m1"])
    g.add_argument("--fp4-recipe", default="nvfp4", choices=["nvfp4", "custom"])
    g.add_argument("--grad-reduce-in-bf16", action="store_true")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"])
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None)
    return p


def add_other_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Stands in for the provider pretrain_gpt.py already passes (add_modelopt_args)."""
    g = parser.add_argument_group(title="modelopt-like")
    g.add_argument("--export-te-mcore-model", action="store_true")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Megatron's parse_args: the extra provider, then parse (rank and world size from the env)."""
    parser = chain_providers(auto_parallel_args, add_other_args)(megatron_parser())
    args = parser.parse_args(argv)
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1"))
    return args


@pytest.fixture
def world(monkeypatch, tmp_path):
    """A torchrun-like environment: WORLD_SIZE=2, RANK=0, plans written under tmp_path."""

    def set_world(size: int = 2, rank: int = 0) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    set_world()
    monkeypatch.setenv("UNIAP_PLAN_DIR", str(tmp_path / "plans"))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return set_world


def run_hook(argv: list[str]) -> tuple[argparse.Namespace, Plan | None]:
    args = parse(argv)
    return args, rewrite_args(args, argv)


def plan_dp(plan: Plan) -> int:
    return plan.uniform_strategy.dp


def core_config(args: argparse.Namespace):
    """megatron-core's TransformerConfig from the rewritten args, as core_transformer_config_from_args
    builds it (frameworks.md 1.3): its __post_init__ enforces Megatron's partitioning rules."""
    torch = pytest.importorskip("torch")
    tc = pytest.importorskip("megatron.core.transformer.transformer_config")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    granularity = "selective" if args.recompute_activations else args.recompute_granularity
    return tc.TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        recompute_granularity=granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
    )


def assert_megatron_accepts(args: argparse.Namespace) -> None:
    """The checks Megatron runs on the final args that do not need GPUs or Megatron-LM."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert args.world_size % (tp * pp) == 0
    dp = args.world_size // (tp * pp)
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0  # num_microbatches_calculator
    if args.overlap_param_gather:
        assert args.overlap_grad_reduce and (args.use_distributed_optimizer or args.use_megatron_fsdp)
    if args.use_megatron_fsdp:
        assert args.ckpt_format == "fsdp_dtensor"
    core_config(args)


# --- the flags -------------------------------------------------------------------------------------


def test_chain_providers_adds_both_groups():
    parser = chain_providers(auto_parallel_args, add_other_args)(megatron_parser())
    titles = {g.title for g in parser._action_groups}
    assert {"auto-parallel (uniap)", "modelopt-like", "distributed"} <= titles
    args = parser.parse_args(["--auto-parallel", "--auto-parallel-time-limit", "5", "--export-te-mcore-model"])
    assert args.auto_parallel and args.export_te_mcore_model and args.auto_parallel_time_limit == 5.0
    assert args.auto_parallel_cluster == "dgx-a100-80g"
    assert args.auto_parallel_plan is None and args.auto_parallel_profile is None
    assert args.auto_parallel_dry_run is False


def test_chain_providers_skips_none_and_keeps_parser_when_provider_returns_none():
    seen = []
    parser = chain_providers(None, lambda p: seen.append(p), auto_parallel_args)(argparse.ArgumentParser())
    assert seen and parser is seen[0]
    assert parser.parse_args([]).auto_parallel is False


def test_without_auto_parallel_args_are_untouched(world):
    argv = TINY_JOB_ARGV + ["--micro-batch-size", "2"]
    args, plan = run_hook(argv)
    assert plan is None
    assert vars(args) == vars(parse(argv))


def test_auto_parallel_option_without_the_switch_is_an_error(world, tmp_path):
    with pytest.raises(SpecError, match="without --auto-parallel"):
        run_hook(TINY_JOB_ARGV + ["--auto-parallel-dry-run"])


# --- rewriting -------------------------------------------------------------------------------------


def test_rank0_plans_and_sets_args_from_the_plan(world, capsys):
    args, plan = run_hook(TINY_JOB_ARGV + ["--auto-parallel"])
    launch = megatron_launch(plan)
    expected = {s.dest: s.value for s in plan_settings(launch.args)}
    for dest, value in expected.items():
        assert getattr(args, dest) == value, dest
    assert args.tensor_model_parallel_size == plan.uniform_strategy.tp
    assert args.pipeline_model_parallel_size == plan.pipeline_degree
    assert args.micro_batch_size == plan.micro_batch_all_replicas // plan_dp(plan)
    assert args.global_batch_size == 8 == plan.training.global_batch_size
    assert plan.cluster.num_nodes * plan.cluster.gpus_per_node == 2
    assert_megatron_accepts(args)
    assert "uniap: auto-parallel: planned on rank 0" in capsys.readouterr().out
    files = list((plugin.Path(os.environ["UNIAP_PLAN_DIR"])).glob("uniap-megatron-plan-*.json"))
    assert len(files) == 1 and Plan.load(files[0]).to_dict() == plan.to_dict()


def test_pinned_tensor_parallel_size_stays(world):
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2"]
    args, plan = run_hook(argv)
    assert args.tensor_model_parallel_size == 2 == plan.uniform_strategy.tp
    assert plan.pins == Pins(tp=2)
    assert args.pipeline_model_parallel_size == plan.pipeline_degree == 1
    assert args.micro_batch_size == plan.micro_batch_all_replicas // plan_dp(plan)
    assert args.global_batch_size == 8
    assert args.sequence_parallel is True  # TP > 1 with sequence parallelism
    assert_megatron_accepts(args)


def test_second_rank_reuses_the_plan_without_solving(world, monkeypatch):
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2"]
    args0, plan0 = run_hook(argv)
    path = plan_file_path(args0, argv, 1, 2)
    assert path.exists()
    mtime, text = path.stat().st_mtime_ns, path.read_text()

    def no_solving(*a, **k):
        raise AssertionError("a rank other than 0 must not plan")

    monkeypatch.setattr(plugin, "plan_megatron", no_solving)
    world(size=2, rank=1)
    args1, plan1 = run_hook(argv)
    assert plan1.to_dict() == plan0.to_dict()
    assert vars(args1) == {**vars(args0), "rank": 1}
    assert path.stat().st_mtime_ns == mtime and path.read_text() == text
    # Rank 0 of an identical relaunch reuses the same file too.
    world(size=2, rank=0)
    _, plan2 = run_hook(argv)
    assert plan2.to_dict() == plan0.to_dict() and path.stat().st_mtime_ns == mtime


def test_plan_file_depends_on_the_job_not_on_the_rank(world):
    argv = TINY_JOB_ARGV + ["--auto-parallel"]
    args = parse(argv)
    base = plan_file_path(args, argv, 1, 2)
    assert plan_file_path(args, argv + ["--local-rank", "1"], 1, 2) == base
    assert plan_file_path(args, argv + ["--auto-parallel-dry-run"], 1, 2) == base
    assert plan_file_path(args, argv, 1, 4) != base
    assert plan_file_path(args, argv + ["--micro-batch-size", "2"], 1, 2) != base
    assert base.parent == plugin.Path(os.environ["UNIAP_PLAN_DIR"])


def test_waiting_rank_times_out_with_a_clear_error(world):
    world(size=2, rank=1)
    with pytest.raises(SpecError, match="UNIAP_PLAN_DIR") as info:
        run_hook(TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-wait", "0.3"])
    assert "rank 1 waited 0.3 s for rank 0's plan" in str(info.value)


def test_waiting_rank_fails_with_rank0s_error(world):
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "3", "--auto-parallel-wait", "5"]
    with pytest.raises(SpecError) as first:
        run_hook(argv)
    world(size=2, rank=1)
    with pytest.raises(SpecError) as second:
        run_hook(argv)
    assert "rank 0 could not plan" in str(second.value) and first.value.message in str(second.value)


@pytest.mark.parametrize(
    "pin, message",
    [
        (["--tensor-model-parallel-size", "3"], "does not divide the 2 GPUs per node"),
        (["--pipeline-model-parallel-size", "4"], "--pipeline-model-parallel-size 4 does not divide the 2 GPUs"),
        (["--micro-batch-size", "3"], "--micro-batch-size 3 does not divide the global batch size 8"),
        (
            ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1", "--micro-batch-size", "16"],
            "--micro-batch-size 16 does not divide the global batch size 8",
        ),
    ],
)
def test_impossible_pin_is_a_clear_error(world, pin, message):
    with pytest.raises(UniapError, match=message) as info:
        run_hook(TINY_JOB_ARGV + ["--auto-parallel", *pin])
    assert info.value.exit_code == 2 and info.value.hint


def test_pin_that_does_not_split_the_heads(world):
    world(size=4)
    argv = [*TINY_JOB_ARGV, "--auto-parallel", "--tensor-model-parallel-size", "4", "--num-attention-heads", "2"]
    with pytest.raises(SpecError, match="attention heads 2"):
        run_hook(argv)


def test_model_that_fits_nowhere_is_infeasible(world):
    huge = [
        "--num-layers",
        "2",
        "--hidden-size",
        "65536",
        "--num-attention-heads",
        "64",
        "--seq-length",
        "8192",
        "--max-position-embeddings",
        "8192",
        "--global-batch-size",
        "64",
        "--bf16",
        "--auto-parallel",
    ]
    with pytest.raises(InfeasibleError) as info:
        run_hook(huge)
    assert info.value.exit_code == 3


def test_explicit_flags_are_never_overridden(world):
    world(size=4)
    argv = TINY_JOB_ARGV + [
        "--auto-parallel",
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "block",
        "--use-distributed-optimizer",
        "--pipeline-model-parallel-size",
        "1",
    ]
    args, plan = run_hook(argv)
    s = plan.uniform_strategy
    assert s.recompute == "full" and plan.pipeline_degree == 1
    assert args.recompute_method == "block"  # the user's, though the plan says uniform
    assert args.recompute_num_layers == 1  # not given: the plan's
    assert args.use_distributed_optimizer is True
    assert args.pipeline_model_parallel_size == 1
    merge = merge_plan(plan, argv)
    assert merge.kept == {"recompute_method": ("block", "uniform")}
    assert_megatron_accepts(args)


def test_recompute_activations_pin_plans_selective_recompute(world):
    args, plan = run_hook(TINY_JOB_ARGV + ["--auto-parallel", "--recompute-activations"])
    assert {lp.strategy.recompute for lp in plan.layers if lp.kind == "transformer"} == {"selective"}
    assert args.recompute_activations and args.recompute_granularity is None  # validate_args sets it
    assert_megatron_accepts(args)


def test_torch_fsdp2_pin_keeps_one_stage_and_no_megatron_fsdp(world, monkeypatch):
    world(size=4)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--use-torch-fsdp2", "--untie-embeddings-and-output-weights"]
    args, plan = run_hook(argv)
    assert plan.pipeline_degree == 1 and args.pipeline_model_parallel_size == 1
    assert args.use_megatron_fsdp is False and args.ckpt_format == "torch_dist"
    assert args.use_distributed_optimizer is False  # FSDP2 forbids the distributed optimizer
    assert merge_plan(plan, argv).env == {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}  # FSDP needs it != 1


def test_tensor_parallel_pin_without_the_connection_setting_is_refused_naming_it(world, monkeypatch):
    """TP 2 over both GPUs leaves no data parallelism for FSDP: with the variable unset no plan can run."""
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2"]
    with pytest.raises(SpecError, match="CUDA_DEVICE_MAX_CONNECTIONS is unset") as info:
        run_hook(argv)
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in info.value.hint and "uniap-megatron run" in info.value.hint
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    with pytest.raises(SpecError, match="'8'"):
        run_hook(argv)
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    with pytest.raises(SpecError, match="--tensor-model-parallel-size 2 without FSDP needs it to be 1"):
        run_hook(argv)


def test_the_launch_environment_limits_the_plan(world, monkeypatch):
    """With CUDA_DEVICE_MAX_CONNECTIONS=1 no FSDP; unset, tensor parallelism only under FSDP; a pinned FSDP flag
    with 1 is refused naming the variable. Every plan made passes the plugin's own environment check."""
    world(size=4)
    argv = TINY_JOB_ARGV + ["--auto-parallel"]
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _args, plan = run_hook(argv + ["--tensor-model-parallel-size", "2"])
    assert plan.uniform_strategy.zero != 3
    with pytest.raises(SpecError, match="needs it other than 1") as info:
        run_hook(argv + ["--use-megatron-fsdp"])
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=8" in info.value.hint
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    args, plan = run_hook(argv + ["--tensor-model-parallel-size", "2"])
    s = plan.uniform_strategy
    assert s.tp == 2 and s.zero == 3 and args.use_megatron_fsdp  # TP only under FSDP here
    _args, plan = run_hook(argv)
    s = plan.uniform_strategy
    assert s.tp == 1 or (s.zero == 3 and s.dp > 1)


def test_plan_file_depends_on_the_connection_setting(world, monkeypatch):
    argv = TINY_JOB_ARGV + ["--auto-parallel"]
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with_one = plan_file_path(parse(argv), argv, 1, 2)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    assert plan_file_path(parse(argv), argv, 1, 2) != with_one


def test_dry_run_prints_the_plan_and_exits_0(world, monkeypatch, capsys):
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-dry-run", "--tensor-model-parallel-size", "2"]
    args = parse(argv)
    with pytest.raises(SystemExit) as info:
        rewrite_args(args, argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "uniap auto-parallel plan" in out and "stage" in out
    assert "Megatron arguments set from the plan: --pipeline-model-parallel-size 1 --micro-batch-size 8" in out
    assert args.pipeline_model_parallel_size == 1 and args.micro_batch_size is None  # nothing applied
    world(size=2, rank=1)
    with pytest.raises(SystemExit):
        rewrite_args(parse(argv), argv)
    assert capsys.readouterr().out == ""  # only rank 0 prints


def test_a_saved_plan_the_environment_rules_out_is_an_error_or_a_dry_run_warning(world, monkeypatch):
    """A saved plan was not made for this launch's CUDA_DEVICE_MAX_CONNECTIONS: the plugin checks it."""
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2"]
    _args, plan = run_hook(argv)
    merge = merge_plan(plan, argv)
    assert merge.env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and plugin.check_env(merge) == []
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    with pytest.raises(SpecError, match="tensor or context parallelism without FSDP"):
        plugin.check_env(merge)
    (warning,) = plugin.check_env(merge, dry_run=True)
    assert "it is unset here" in warning


# --- saved plans -----------------------------------------------------------------------------------


def test_saved_plan_is_used_as_is(world, monkeypatch, tmp_path):
    saved = plan_megatron(TINY_JOB_ARGV + ["--tensor-model-parallel-size", "2"], 1, 2)
    path = tmp_path / "plan.json"
    saved.save(path)
    monkeypatch.setattr(plugin, "plan_megatron", lambda *a, **k: pytest.fail("must not plan"))
    args, plan = run_hook(TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-plan", str(path)])
    assert plan.to_dict() == saved.to_dict()
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel
    assert args.micro_batch_size == saved.micro_batch_all_replicas // plan_dp(saved)
    assert not (tmp_path / "plans").exists()  # nothing written


def test_saved_plan_for_another_job_is_refused(world, tmp_path):
    saved = plan_megatron(TINY_JOB_ARGV, 1, 4)
    path = tmp_path / "plan.json"
    saved.save(path)
    with pytest.raises(SpecError, match="is for 4 GPUs"):
        run_hook(TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-plan", str(path)])
    world(size=4)
    other = [a if a != "64" else "128" for a in TINY_JOB_ARGV]  # hidden size 128
    with pytest.raises(SpecError, match="hidden_size 64 \\(command line: 128\\)"):
        run_hook(other + ["--auto-parallel", "--auto-parallel-plan", str(path)])


def test_saved_plan_contradicting_a_pin_is_refused(world, tmp_path):
    saved = plan_megatron(TINY_JOB_ARGV + ["--tensor-model-parallel-size", "1"], 1, 2)
    path = tmp_path / "plan.json"
    saved.save(path)
    with pytest.raises(SpecError, match="plan sets --tensor-model-parallel-size 1 but the command line gives 2"):
        run_hook(
            TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-plan", str(path), "--tensor-model-parallel-size", "2"]
        )


def test_missing_saved_plan_is_a_clear_error(world, tmp_path):
    with pytest.raises(SpecError, match="cannot read plan file"):
        run_hook(TINY_JOB_ARGV + ["--auto-parallel", "--auto-parallel-plan", str(tmp_path / "none.json")])


# --- the plan's flags ------------------------------------------------------------------------------


def test_every_plan_flag_maps_to_megatrons_dest():
    argv = [
        "--tensor-model-parallel-size",
        "2",
        "--context-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "4",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "64",
        "--decoder-first-pipeline-num-layers",
        "3",
        "--decoder-last-pipeline-num-layers",
        "5",
        "--pipeline-model-parallel-layout",
        "Et|t|t|tL",
        "--num-virtual-stages-per-pipeline-rank",
        "2",
        "--sequence-parallel",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--use-megatron-fsdp",
        "--data-parallel-sharding-strategy",
        "optim_grads_params",
        "--no-gradient-accumulation-fusion",
        "--ckpt-format",
        "fsdp_dtensor",
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "1",
        "--cpu-offloading-num-layers",
        "3",
        "--bf16",
        "--fp16",
        "--fp8-format",
        "hybrid",
        "--fp8-recipe",
        "tensorwise",
        "--tp-comm-overlap",
        "--fp8-param-gather",
        "--fp4-format",
        "e2m1",
        "--fp4-recipe",
        "nvfp4",
        "--grad-reduce-in-bf16",
    ]
    assert {a for a in argv if a.startswith("--")} == {f.spelling for f in PLAN_FLAGS}
    mine = {s.dest: s.value for s in plan_settings(argv)}
    theirs = vars(megatron_parser().parse_args(argv))
    assert mine == {k: theirs[k] for k in mine}
    assert mine["gradient_accumulation_fusion"] is False


# --- install() -------------------------------------------------------------------------------------


def test_install_without_megatron_lm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training", None)
    with pytest.raises(ImportError, match="Megatron-LM's `megatron.training` package"):
        install()


@pytest.fixture
def fake_megatron(monkeypatch):
    """megatron.training.{initialize,arguments} stand-ins; validate_args records what it saw."""
    seen = []

    def validate_args(args, defaults={}):
        seen.append((vars(args).copy(), defaults))
        return args

    training = types.ModuleType("megatron.training")
    initialize = types.ModuleType("megatron.training.initialize")
    arguments = types.ModuleType("megatron.training.arguments")
    initialize.validate_args = validate_args
    arguments.validate_args = validate_args
    training.initialize, training.arguments = initialize, arguments
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.initialize", initialize)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", arguments)
    return initialize, arguments, seen


def test_install_wraps_validate_args(world, fake_megatron, monkeypatch):
    initialize, arguments, seen = fake_megatron
    install()
    install()  # idempotent
    wrapped = initialize.validate_args
    assert wrapped._uniap_wrapped and not getattr(wrapped.__wrapped__, "_uniap_wrapped", False)
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "2"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    args = parse(argv)
    initialize.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    arguments.validate_args(args, {})  # the other name: no second rewrite
    (first, defaults), (second, _) = seen
    assert defaults == {"tokenizer_type": "GPT2BPETokenizer"}
    assert first["tensor_model_parallel_size"] == 2 and first["micro_batch_size"] == 8
    assert first == second


def test_installed_hook_reports_errors_without_traceback(world, fake_megatron, monkeypatch, capsys):
    initialize, _, seen = fake_megatron
    install()
    argv = TINY_JOB_ARGV + ["--auto-parallel", "--tensor-model-parallel-size", "3"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    with pytest.raises(SystemExit) as info:
        initialize.validate_args(parse(argv), {})
    assert info.value.code == 2 and not seen
    err = capsys.readouterr().err
    assert err.startswith("uniap: error: --tensor-model-parallel-size 3") and "Traceback" not in err


def test_world_shape_from_torchrun_or_slurm(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert plugin.world_shape() == (2, 8)  # torchrun's LOCAL_WORLD_SIZE first
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert plugin.world_shape() == (4, 4)  # one Slurm task per GPU
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert plugin.world_shape() == (1, 16)


# --- two real ranks --------------------------------------------------------------------------------

PRETRAIN = """import json, os, sys, types
# Megatron-LM's training package, reduced to what the hook patches (validate_args, imported by name).
training = types.ModuleType("megatron.training")
initialize = types.ModuleType("megatron.training.initialize")
arguments = types.ModuleType("megatron.training.arguments")
initialize.validate_args = arguments.validate_args = lambda args, defaults={}: args
training.initialize, training.arguments = initialize, arguments
sys.modules.update({"megatron.training": training, "megatron.training.initialize": initialize,
                    "megatron.training.arguments": arguments})

from uniap_megatron import plugin
from uniap_megatron.plugin import auto_parallel_args, chain_providers, install

install()
if os.environ["RANK"] != "0":
    def no_solving(*a, **k):
        raise AssertionError("only rank 0 plans")
    plugin.plan_megatron = no_solving
from test_megatron_plugin import add_other_args, megatron_parser

# pretrain() -> initialize_megatron -> parse_args(extra_args_provider) -> validate_args(args, defaults)
parser = chain_providers(auto_parallel_args, add_other_args)(megatron_parser())
parser.add_argument("--record-dir")
args = parser.parse_args()
sys.modules["megatron.training.initialize"].validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
with open(os.path.join(args.record_dir, "rank%s.json" % os.environ["RANK"]), "w") as fh:
    json.dump(vars(args), fh)
"""


@pytest.mark.slow
def test_two_ranks_plan_once_through_the_installed_hook(tmp_path):
    torchrun = plugin.Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    script = tmp_path / "pretrain_fake.py"
    script.write_text(PRETRAIN)
    record, plans = tmp_path / "record", tmp_path / "plans"
    record.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
        "UNIAP_PLAN_DIR": str(plans),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            "--auto-parallel",
            *TINY_JOB_ARGV,
            "--tensor-model-parallel-size",
            "2",
            "--record-dir",
            str(record),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = (json.loads((record / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (rank0.pop("local_rank"), rank1.pop("local_rank")) == (0, 1)  # torchrun's LOCAL_RANK
    assert rank0 == rank1
    (plan_file,) = plans.glob("uniap-megatron-plan-*.json")
    plan = Plan.load(plan_file)
    assert rank0["tensor_model_parallel_size"] == 2 == plan.uniform_strategy.tp
    assert rank0["micro_batch_size"] == plan.micro_batch_all_replicas // plan.uniform_strategy.dp
    assert rank0["sequence_parallel"] is True
    assert r.stdout.count("uniap: auto-parallel: planned on rank 0") == 1
