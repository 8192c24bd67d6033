"""Megatron-LM core_v0.16.1's own argument code (megatron/training/arguments.py), run for real in a subprocess.

Megatron-LM's training package is not on PyPI; tests find a copy through MEGATRON_LM_PATH (which .ci/run
sets to the vendored one) and skip with a reason elsewhere. PREAMBLE makes its modules importable on a
CPU-only torch; `validate` runs Megatron's `parse_args` + `validate_args` on many command lines in one
process, `parser_actions` reports how Megatron's parser defines a list of flags.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import child_env

MEGATRON_LM_ENV = "MEGATRON_LM_PATH"
MEGATRON_LM_NAME = "megatron-lm-core_v0.16.1"
RUN_TIMEOUT_S = 600
# A report key that is not an attribute of `args`: the decoder layers each pipeline rank builds, from the
# TransformerConfig Megatron-LM derives (core_transformer_config_from_args, get_num_layers_to_build).
LAYERS_PER_STAGE = "layers_per_stage"
# The GPU the arguments are validated for: Hopper (H100/H200), compute capability 9. validate_args asks the
# device's architecture (utils.get_device_arch_version) to choose CUDA_DEVICE_MAX_CONNECTIONS rules.
DEVICE_ARCH = 9

PREAMBLE = f"""
import importlib.util
import sys
import types

# Import-time only: megatron.training's tokenizer modules import six and regex, and its initialize module
# imports megatron-core's Triton kernels; none of them runs here. Stand-ins only where not installed.
for name in ("six", "regex"):
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = types.ModuleType(name)
if importlib.util.find_spec("triton") is None:
    kernels = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    kernels.enable_batch_invariant_mode = None
    sys.modules[kernels.__name__] = kernels

import megatron.training.arguments as megatron_arguments

# validate_args reads the GPU's architecture through torch.cuda (a CPU build here): the planned GPU's.
megatron_arguments.get_device_arch_version = lambda: {DEVICE_ARCH}
"""

VALIDATE_PROGRAM = (
    PREAMBLE
    + """
import contextlib
import io
import json
import os

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_block import get_num_layers_to_build

LAYERS_PER_STAGE = "layers_per_stage"
cases = json.loads(sys.stdin.read())
results = []
for case in cases:
    os.environ.clear()
    os.environ.update(case["env"])
    sys.argv = ["pretrain_gpt.py", *case["argv"]]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args = megatron_arguments.parse_args()
            megatron_arguments.validate_args(args, {})
    except (AssertionError, ValueError, RuntimeError, SystemExit) as exc:
        text = str(exc) or out.getvalue().strip().splitlines()[-1:] or [type(exc).__name__]
        results.append({"error": text if isinstance(text, str) else text[0]})
        continue
    report = {k: getattr(args, k, None) for k in case["report"] if k != LAYERS_PER_STAGE}
    if LAYERS_PER_STAGE in case["report"]:
        # The model Megatron-LM builds: its TransformerConfig (which checks its own rules), and the decoder
        # layers each pipeline rank builds from it.
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                config = megatron_arguments.core_transformer_config_from_args(args)
        except (AssertionError, ValueError, RuntimeError) as exc:
            results.append({"error": f"TransformerConfig: {exc}"})
            continue
        # Per model chunk in placement order: chunk k of every rank, then chunk k + 1 (one chunk without VPP).
        pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
        stages = [(k if vpp else None, i) for k in range(vpp or 1) for i in range(pp)]
        layout = config.pipeline_model_parallel_layout
        if layout is not None:  # its getters read the chunk from parallel_state, which is not set up here
            counts = [layout.layout[i][k or 0].count(LayerType.decoder) for k, i in stages]
        else:
            counts = [get_num_layers_to_build(config, vp_stage=k, pp_rank=i) for k, i in stages]
        report[LAYERS_PER_STAGE] = counts
    results.append({"args": report})
print(json.dumps(results))
"""
)

ACTIONS_PROGRAM = (
    PREAMBLE
    + """
import argparse
import json

parser = megatron_arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
actions = {s: a for a in parser._actions for s in a.option_strings}
out = {}
for spelling in json.loads(sys.stdin.read()):
    a = actions.get(spelling)
    out[spelling] = None if a is None else {
        "dest": a.dest, "action": type(a).__name__, "type": getattr(a.type, "__name__", None),
        "default": a.default if isinstance(a.default, (int, float, str, bool, type(None))) else repr(a.default),
        "const": a.const if isinstance(a.const, (int, float, str, bool, type(None))) else repr(a.const)}
print(json.dumps(out))
"""
)


def megatron_lm_path() -> Path | None:
    path = os.environ.get(MEGATRON_LM_ENV)
    return Path(path) if path and (Path(path) / "megatron" / "training" / "arguments.py").is_file() else None


def skip_reason() -> str | None:
    """Why Megatron-LM's own code cannot run here, or None."""
    if megatron_lm_path() is None:
        return (
            f"Megatron-LM core_v0.16.1's training package not found: set {MEGATRON_LM_ENV} to the folder "
            f"holding megatron/training ({MEGATRON_LM_NAME})"
        )
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("megatron.core") is None:
        return "torch or megatron-core is not installed"
    return None


def require() -> Path:
    """The Megatron-LM folder, or skip the calling test with the reason."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return megatron_lm_path()


def environment() -> dict[str, str]:
    """A child's environment (tests/processes.py) with Megatron-LM importable; each case sets the plan's
    CUDA_DEVICE_MAX_CONNECTIONS itself."""
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(require()), env.get("PYTHONPATH", "")) if p)
    return env


def _run(program: str, payload) -> object:
    proc = subprocess.run(
        [sys.executable, "-c", program],
        input=json.dumps(payload),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    if proc.returncode:
        pytest.fail(f"Megatron-LM's argument code failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def validate(cases: list[tuple[list[str], dict[str, str], int]], report: tuple[str, ...] = ()) -> list[dict]:
    """Megatron-LM's parse_args + validate_args on each (argv, environment, world size): per case
    {"error": message} or {"args": {name: value for name in report}} (LAYERS_PER_STAGE: also its
    TransformerConfig, and the layers each pipeline rank builds). NullTokenizer is added where the
    command line names no tokenizer (validate_args needs one; the planner does not)."""
    payload = []
    for argv, env, world in cases:
        argv = list(argv) if "--tokenizer-type" in argv else [*argv, "--tokenizer-type", "NullTokenizer"]
        payload.append({"argv": argv, "env": {**env, "WORLD_SIZE": str(world), "RANK": "0"}, "report": list(report)})
    return _run(VALIDATE_PROGRAM, payload)


def parser_actions(spellings: list[str]) -> dict[str, dict | None]:
    """How Megatron-LM's parser defines each flag: dest, argparse action class, type, default, const."""
    return _run(ACTIONS_PROGRAM, spellings)
