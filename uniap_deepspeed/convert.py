"""`uniap convert deepspeed`: an existing DeepSpeed job (its config, and its launch script for the cluster's shape)
priced as it is, planned, and the plan merged into a copy of the config beside the original.

The current configuration is what the config says: ZeRO stage, micro-batch size per GPU, accumulation steps,
the global batch and the precision; the pipeline stages the training script builds (a PipelineModule's
num_stages is in the script, not the config) come from --pipeline-stages, one by default. The cluster's shape
comes from --launch (the deepspeed launcher's --num_nodes / --num_gpus, torchrun's, or #SBATCH), else
--nodes / --gpus-per-node. The converted config is uniap_deepspeed.merge's: everything of the user's kept, the
keys a plan decides set, each change printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from uniap.errors import EXIT_OK, SpecError
from uniap.entry import guarded
from uniap.conversion import (
    Configuration,
    add_options,
    conversion_parser,
    before_after,
    conversion_report,
    keep_choices,
    output_path,
)
from uniap.io import read_text, write_json_atomic
from uniap.launch import read_launch
from uniap.cost.strategy import OFFLOAD_NONE

from .capability import DEEPSPEED
from .config import (
    HPZ_PARTITION_SIZE,
    OFFLOAD_DEVICE,
    OFFLOAD_KEYS,
    QUANTIZED_GRADIENTS,
    QUANTIZED_WEIGHTS,
    deepspeed_config,
    plan_for_deepspeed,
    read_base,
)
from .merge import BATCH_KEYS, base_job, merge_config

PROG = "uniap convert deepspeed"
NO_DEVICE = "none"  # DeepSpeed's offload device when nothing is offloaded (runtime/zero/offload_config.py)
KEEP = ("zero", "pp", "mbs")


def zero_variant(section: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO variant a zero_optimization section runs (uniap.cost.strategy.Strategy's offload and zeropp):
    offloading to the CPU; ZeRO++ when its three parts are on together (what uniap prices; one or two of them
    are priced as plain ZeRO-3). SpecError for what DeepSpeed 0.19 or uniap cannot run or price."""
    removed = [key for key in ("mics_shard_size", "mics_hierarchical_params_gather") if key in section]
    if removed:
        raise SpecError(
            f"zero_optimization.{removed[0]}: MiCS was removed in DeepSpeed 0.19, which refuses this config "
            "(deepspeed/runtime/config.py _REMOVED_ZERO_CONFIG_KEYS)",
            "drop the MiCS keys; uniap prices the job as ZeRO-3 and may offer ZeRO++ across nodes",
        )
    offload = OFFLOAD_NONE
    for mode, key in OFFLOAD_KEYS.items():  # the optimizer's, then the parameters' (which offload both)
        part = section.get(key)
        device = part.get("device", NO_DEVICE) if isinstance(part, dict) else NO_DEVICE
        if device not in (NO_DEVICE, OFFLOAD_DEVICE):
            raise SpecError(
                f"zero_optimization.{key}.device is {device!r}; uniap prices offloading to CPU memory only",
                f'set "device": "{OFFLOAD_DEVICE}" to compare, or convert the job without offloading',
            )
        if device == OFFLOAD_DEVICE:
            offload = mode
    zeropp = bool(
        section.get(QUANTIZED_WEIGHTS) and section.get(QUANTIZED_GRADIENTS) and section.get(HPZ_PARTITION_SIZE, 1) > 1
    )
    return {"offload": offload, "zeropp": zeropp}


def current_settings(config: dict[str, Any], gpus: int, pipeline_stages: int) -> dict[str, Any]:
    """ZeRO stage and variant, micro-batch size, accumulation steps and global batch as DeepSpeed derives them
    from the config (any two of the three batch keys give the third, deepspeed/runtime/config.py
    _configure_train_batch_size); SpecError naming a missing or inconsistent key."""
    section = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    zero = section.get("stage", 0)
    values = {key: config.get(key) for key in BATCH_KEYS}
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SpecError(f"{key} is {value!r}; converting needs the job's numbers", f"write {key} as a number")
    if pipeline_stages < 1:
        raise SpecError(f"--pipeline-stages must be at least 1 (got {pipeline_stages})")
    if gpus % pipeline_stages:
        raise SpecError(f"{pipeline_stages} pipeline stages do not divide the {gpus} GPUs")
    dp = gpus // pipeline_stages
    batch, mbs, gas = (values[k] for k in BATCH_KEYS)
    if batch and mbs and not gas:
        gas = batch // (mbs * dp)
    elif batch and gas and not mbs:
        mbs = batch // (gas * dp)
    elif mbs and not batch:
        gas = gas or 1
        batch = mbs * gas * dp
    if not (batch and mbs and gas) or batch != mbs * gas * dp:
        raise SpecError(
            f"the config's batch (train_batch_size {values['train_batch_size']}, train_micro_batch_size_per_gpu "
            f"{values['train_micro_batch_size_per_gpu']}, gradient_accumulation_steps "
            f"{values['gradient_accumulation_steps']}) does not hold for {dp} data-parallel ranks",
            "check --nodes / --gpus-per-node / --pipeline-stages, or the config's batch keys",
        )
    if zero not in (0, 1, 2, 3):
        raise SpecError(f"zero_optimization.stage is {zero!r}; DeepSpeed's stages are 0 to 3")
    return {
        "zero": zero,
        "micro_batch_size": mbs,
        "accumulation": gas,
        "global_batch_size": batch,
        **zero_variant(section),
    }


def convert(args) -> int:
    from uniap.cluster.spec import load_cluster
    from uniap.model.loaders import load_model
    from uniap.planner import configure
    from uniap.model.spec import training_spec
    from uniap.profile.schema import Profile

    path = Path(args.config)
    base = read_base(path)
    nodes, gpus = args.nodes, args.gpus_per_node
    if args.launch:
        launch = read_launch(read_text(Path(args.launch), "launch script"), args.launch)
        nodes, gpus = nodes or launch.nodes, gpus or launch.gpus_per_node
    nodes = nodes or 1
    cluster = load_cluster(args.cluster, nodes, gpus)
    current = current_settings(base, cluster.num_gpus, args.pipeline_stages)
    precision = base_job(base).get("precision", "fp32")  # DeepSpeed trains in fp32 unless a section enables one
    model = load_model(args.model)
    training = training_spec(model, current["global_batch_size"], args.seq_length, precision=precision)
    profile = Profile.load(args.profile) if args.profile else None
    keep = keep_choices(args.keep, KEEP)
    offloads = current["offload"] != OFFLOAD_NONE and current["zero"] > 0  # configure refuses hosts not described
    plan_now, prediction = configure(
        model,
        cluster,
        training,
        target=DEEPSPEED.name,
        tp=1,
        pp=args.pipeline_stages,
        micro_batch_size=current["micro_batch_size"],
        zero=current["zero"] if cluster.num_gpus // args.pipeline_stages > 1 or offloads else 0,
        recompute=args.recompute,
        profile=profile,
        offload=current["offload"] if current["zero"] else OFFLOAD_NONE,  # DeepSpeed offloads under ZeRO only
        zeropp=current["zeropp"] and current["zero"] == 3 and cluster.num_gpus > cluster.gpus_per_node,
    )
    before = Configuration(
        "current", plan_now, prediction.fits, max(prediction.stage_memory), prediction.memory_capacity
    )
    plan = plan_for_deepspeed(
        args.model,
        cluster=args.cluster,
        nodes=nodes,
        gpus_per_node=cluster.gpus_per_node,
        global_batch_size=current["global_batch_size"],
        seq_length=args.seq_length,
        zero_stage=current["zero"] if "zero" in keep else None,
        offload=current["offload"] if "zero" in keep else None,
        pipeline_stages=args.pipeline_stages if "pp" in keep else None,
        precision=precision,
        profile=args.profile,
        time_limit=args.time_limit,
    )
    after = Configuration.planned(plan)
    merged = merge_config(deepspeed_config(plan), base)
    out_path = output_path(
        path, args.output, args.force, "config", [args.launch, args.model, args.cluster, args.profile]
    )
    write_json_atomic(out_path, merged.config)
    changes = [f"{key}: {why}" for key, why in merged.changes]
    if args.json:
        print(
            json.dumps(
                conversion_report(before, after, changes=changes, converted=str(out_path)),
                indent=2,
            )
        )
        return EXIT_OK
    print(f"{PROG}: {path}, {nodes} x {cluster.gpus_per_node} GPUs of {cluster.name} ({cluster.gpu_name})")
    print(before_after(before, after, [], changes, changed="config"))
    if plan.pipeline_degree > 1:
        print(
            f"  the plan has {plan.pipeline_degree} pipeline stages: build the model with "
            "uniap_deepspeed.pipeline.PlannedPipelineModule and the plan (--save-plan of uniap-deepspeed config)"
        )
    print(f"\n  converted config written to {out_path} (the original is unchanged)")
    return EXIT_OK


DESCRIPTION = """\
Price an existing DeepSpeed job as its config has it, plan it, and write the
plan merged into a copy of the config (NAME.uniap.json beside it, or -o).
  uniap convert deepspeed ds_config.json --model llama2-7b --nodes 2 --gpus-per-node 8
  uniap convert deepspeed ds_config.json --model my_model/config.json --launch launch.sh
The config's batch keys, ZeRO stage (with CPU offload or ZeRO++) and precision are
the current configuration ("--keep zero" keeps the stage and its offloading);
the pipeline stages the script builds are --pipeline-stages (the config does not
hold them). The original config is never modified."""


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(PROG, DESCRIPTION)
    p.add_argument("config", help="the job's DeepSpeed config JSON")
    p.add_argument("--model", required=True, help="model preset, uniap spec, or Hugging Face config.json (required)")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--launch", help="the job's launch script, for its nodes and GPUs per node (default: none)")
    p.add_argument("--nodes", type=int, help="nodes (default: --launch's, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: --launch's, else the cluster's)")
    p.add_argument(
        "--pipeline-stages", type=int, default=1, help="pipeline stages the script builds today (default: %(default)s)"
    )
    p.add_argument(
        "--recompute",
        choices=("none", "full"),
        default="none",
        help="whether the script checkpoints activations today: %(choices)s (default: %(default)s)",
    )
    add_options(p, KEEP, "config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return guarded(PROG, lambda: convert(args))
