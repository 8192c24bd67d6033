"""uniap.profile.logs on training logs printed by the frameworks' own logging code, run on the CPU.

Two programs, started together once per module (each about 6 s of CPU), print the logs:
- DeepSpeed 0.19.8 (DS_ACCELERATOR=cpu, one process, gloo) trains tests/ds_train.py's tiny GPT with
  steps_per_print 1, wall_clock_breakdown and log level info, three engines one after the other: the plain
  engine with 2 micro-batches per step (ThroughputTimer and wall-clock timer lines), the plain engine with
  memory_breakdown for one step (see_memory_usage lines; each calls gc.collect(), slow), and a one-stage
  PipelineEngine (its "steps: ... iter time (s)" lines). Nothing is patched: DeepSpeed's CPU accelerator
  reports the process's memory.
- Megatron-LM core_v0.16.1 (not on PyPI; found through MEGATRON_LM_PATH, which .ci/run sets to the
  vendored copy, else those tests skip): its own parse_args, validate_args and
  set_global_variables on a minimal command line, then `training_log` called for 10 iterations the way
  train() calls it, each iteration a sleep of known length (the first one long), with report_memory at the
  iterations Megatron chooses. The few CUDA calls on that path are redirected one by one in MEGATRON_PROGRAM.
The other tests edit those logs (launcher prefixes, a cut last line, a garbled number, two runs in one log).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import megatron_lm
import pytest
from uniap.errors import EXIT_INVALID_INPUT
from uniap.profile.logs import LogError, LogMeasurement, parse_log, read_log

pytestmark = pytest.mark.slow  # the logs come from DeepSpeed and Megatron-LM run in subprocesses

TESTS = Path(__file__).resolve().parent
MIB, GIB = 2.0**20, 2.0**30
RUN_TIMEOUT_S = 600

# --- Megatron-LM -------------------------------------------------------------------------------------------
TRAIN_ITERS, LOG_INTERVAL, LOG_MEMORY_INTERVAL = 10, 2, 4
FIRST_SLEEP_S, SLEEP_S = 0.3, 0.03
MEGATRON_ARGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-4",
    "--train-iters",
    str(TRAIN_ITERS),
    "--log-interval",
    str(LOG_INTERVAL),
    "--log-throughput",
    "--log-memory-interval",
    str(LOG_MEMORY_INTERVAL),
    "--log-device-memory-used",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "128",
]


def megatron_memory_mib(iteration: int) -> dict[str, float]:
    """What the program's stand-in CUDA allocator reports during `iteration` (MiB, exact in "{:.2f}")."""
    return {
        "allocated": 100 + iteration,
        "max_allocated": 200 + 8 * iteration + 0.25,
        "reserved": 300 + iteration,
        "max_reserved": 400 + 8 * iteration + 0.5,
        "device_used": 500 + iteration,
    }


MEGATRON_PROGRAM = (
    megatron_lm.PREAMBLE
    + f'''
"""Megatron-LM core_v0.16.1's training_log, called as train() calls it (training.py:2571-2911), on CPU."""
import json
import time

import torch
import torch.distributed as dist

# The CUDA calls on this path, each redirected (torch is a CPU build):
# - megatron.core.timers Timer.start/stop synchronize the device;
torch.cuda.synchronize = lambda device=None: None
# - reduce_max_stat_across_model_parallel_group (training/utils.py:253) puts the learning rate on it;
torch.cuda.current_device = lambda: "cpu"
# - report_memory (training/utils.py:279-292) reads the CUDA caching allocator, which reports 0 without CUDA:
#   it reads these byte counts instead (set per iteration below).
MEMORY = {{}}
torch.cuda.memory_allocated = lambda device=None: MEMORY["allocated"]
torch.cuda.max_memory_allocated = lambda device=None: MEMORY["max_allocated"]
torch.cuda.memory_reserved = lambda device=None: MEMORY["reserved"]
torch.cuda.max_memory_reserved = lambda device=None: MEMORY["max_reserved"]
torch.cuda.device_memory_used = lambda device=None: MEMORY["device_used"]

from megatron.core import parallel_state
from megatron.training import training
from megatron.training.arguments import parse_args, validate_args
from megatron.training.global_vars import get_timers, set_global_variables


class CpuTensors(types.ModuleType):
    """torch as training.py sees it: training_log keeps its loss sums in torch.tensor(..., device="cuda")
    (training.py:1816 and 2072); those are made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)


training.torch = CpuTensors("torch")


init_file, memory_mib = sys.argv[1], json.loads(sys.argv[2])  # iteration -> {{what: MiB}}
sys.argv = ["pretrain_gpt.py", *sys.argv[3:]]
args = parse_args()
validate_args(args, {{}})
set_global_variables(args)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=0, world_size=1)
parallel_state.initialize_model_parallel()
get_timers()("interval-time", log_level=0).start(barrier=True)
report_memory_flag = True
total_loss_dict = {{}}
for iteration in range(1, args.train_iters + 1):
    time.sleep({FIRST_SLEEP_S} if iteration == 1 else {SLEEP_S})  # the training step
    MEMORY.update({{k: int(v * 2**20) for k, v in memory_mib[str(iteration)].items()}})
    args.consumed_train_samples += args.global_batch_size
    loss_dict = {{"lm loss": torch.tensor([4.0 - 0.1 * iteration])}}
    report_memory_flag = training.training_log(
        loss_dict, total_loss_dict, args.lr, iteration, 1.0, report_memory_flag, 0, 1.5, None, None, None,
        pg_collection=None, is_first_iteration=iteration == 1)
dist.destroy_process_group()
'''
)


# --- DeepSpeed -----------------------------------------------------------------------------------------------
DS_LOGGING = {"steps_per_print": 1, "wall_clock_breakdown": True, "log_level": "info"}
DS_RUNS = [  # run one after the other in one process: (name, engine, steps, config)
    (
        "ds_plain",
        "plain",
        6,
        {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, **DS_LOGGING},
    ),
    (
        "ds_memory",
        "plain",
        1,
        {
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "memory_breakdown": True,
            **DS_LOGGING,
        },
    ),
    (
        "ds_pipe",
        "pipe",
        5,
        {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, **DS_LOGGING},
    ),
]
DS_SEPARATOR = "=== test_logs run: "  # the program prints it before each run; the log of a run is what follows

DS_PROGRAM = f'''
"""DeepSpeed 0.19.8 engines training tests/ds_train.py's tiny GPT in one CPU process, one run after the other."""
import itertools
import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
import deepspeed
from deepspeed.pipe import LayerSpec, PipelineModule
from ds_train import LAYERS, EmbeddingPipe, HeadPipe, TinyGPT, TransformerLayerPipe, dataset, lm_loss, micro_batches

init_file, runs = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo", init_method="file://" + init_file, rank=0, world_size=1,
                           auto_mpi_discovery=False)
for name, engine_kind, steps, config in runs:
    print("{DS_SEPARATOR}" + name, flush=True)
    ids, labels = dataset(config["train_batch_size"], 1234)
    torch.manual_seed(1234)
    if engine_kind == "plain":
        model = TinyGPT()
    else:
        layers = [LayerSpec(EmbeddingPipe), *[LayerSpec(TransformerLayerPipe) for _ in range(LAYERS)],
                  LayerSpec(HeadPipe)]
        model = PipelineModule(layers, num_stages=1, loss_fn=lm_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      optimizer=torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0))
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    batches = micro_batches(ids, labels, 0, 1, micro, gas)
    if engine_kind == "plain":
        for _ in range(steps):
            for x, y in batches:
                engine.backward(engine(x, y))
                engine.step()
    else:
        data = itertools.cycle(batches)
        for _ in range(steps):
            engine.train_batch(data_iter=data)
deepspeed.comm.destroy_process_group()
'''


# --- the runs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    log: str  # what the frameworks printed (the program's stdout)
    failure: str | None = None  # the program's output, when it failed
    skip: str | None = None  # why it cannot run here


def _start(tmp: Path) -> tuple[dict[str, subprocess.Popen], dict[str, str]]:
    """The DeepSpeed program and the Megatron-LM program, started at once; the reasons for those that cannot."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    }
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pythonpath = base.get("PYTHONPATH", "")
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}
    skips: dict[str, str] = {}
    missing = [m for m in ("torch", "deepspeed") if importlib.util.find_spec(m) is None]
    if missing:
        skips["deepspeed"] = f"{missing[0]} is not installed"
    else:
        (tmp / "ds_program.py").write_text(DS_PROGRAM)
        env = {
            **base,
            "DS_ACCELERATOR": "cpu",
            "LOCAL_RANK": "0",
            "PYTHONPATH": os.pathsep.join([str(TESTS), pythonpath]),
        }
        commands["deepspeed"] = (
            [sys.executable, str(tmp / "ds_program.py"), str(tmp / "deepspeed.pg"), json.dumps(DS_RUNS)],
            env,
        )
    vendor = megatron_lm.megatron_lm_path()
    if megatron_lm.skip_reason():
        skips["megatron"] = megatron_lm.skip_reason()
    else:
        (tmp / "megatron_program.py").write_text(MEGATRON_PROGRAM)
        env = {**base, "PYTHONPATH": os.pathsep.join([str(vendor), pythonpath])}
        memory = json.dumps({i: megatron_memory_mib(i) for i in range(1, TRAIN_ITERS + 1)})
        commands["megatron"] = (
            [sys.executable, str(tmp / "megatron_program.py"), str(tmp / "megatron.pg"), memory, *MEGATRON_ARGS],
            env,
        )
    procs = {
        name: subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (cmd, env) in commands.items()
    }
    return procs, skips


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Each log by name ("megatron", "ds_plain", "ds_memory", "ds_pipe")."""
    procs, skips = _start(tmp_path_factory.mktemp("logs"))
    outputs: dict[str, Run] = {}
    for program, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
            failure = f"exit code {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            failure = f"ran past {RUN_TIMEOUT_S} s"
        if failure:
            failure += f"\nSTDOUT:\n{stdout[-5000:]}\nSTDERR:\n{stderr[-5000:]}"
        outputs[program] = Run(stdout, failure)
    out = {name: Run("", skip=why) for name, why in skips.items()}
    if "megatron" in outputs:
        out["megatron"] = outputs["megatron"]
    for name, *_ in DS_RUNS:
        if "deepspeed" in skips:
            out[name] = Run("", skip=skips["deepspeed"])
        else:
            ds = outputs["deepspeed"]
            part = ds.log.split(DS_SEPARATOR + name + "\n", 1)[-1].split(DS_SEPARATOR, 1)[0]
            out[name] = Run(part if DS_SEPARATOR + name + "\n" in ds.log else "", ds.failure)
    return out


def log_of(runs: dict[str, Run], name: str) -> str:
    run = runs[name]
    if run.skip:
        pytest.skip(run.skip)
    if run.failure:
        pytest.fail(f"the {name} run failed: {run.failure}")
    return run.log


@pytest.fixture
def megatron_log(runs) -> str:
    return log_of(runs, "megatron")


@pytest.fixture
def ds_plain_log(runs) -> str:
    return log_of(runs, "ds_plain")


@pytest.fixture
def ds_memory_log(runs) -> str:
    return log_of(runs, "ds_memory")


@pytest.fixture
def ds_pipe_log(runs) -> str:
    return log_of(runs, "ds_pipe")


def lines_with(text: str, marker: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line holding `marker`."""
    return [(i, line) for i, line in enumerate(text.split("\n"), start=1) if marker in line]


def field(line: str, name: str, end: str) -> float:
    """The number after `name` and before `end` in `line` (a plain reading, independent of the module's)."""
    return float(line.split(name, 1)[1].split(end, 1)[0].strip())


def same_measurement(a: LogMeasurement, b: LogMeasurement) -> None:
    assert replace(a, source="") == replace(b, source="")


# --- Megatron-LM --------------------------------------------------------------------------------------------
def test_megatron_training_log(megatron_log):
    m = parse_log(megatron_log, source="megatron.log")
    printed = lines_with(megatron_log, "elapsed time per iteration (ms):")
    # training_log prints after the first iteration, then every log interval
    assert [int(field(line, " iteration ", "/")) for _, line in printed] == [1, 2, 4, 6, 8, 10]
    assert m.framework == "megatron" and m.iterations == TRAIN_ITERS and m.source == "megatron.log"
    ms = [field(line, "elapsed time per iteration (ms):", "|") for _, line in printed]
    assert m.iteration_times_s == tuple(v / 1000 for v in ms)
    assert m.timing == "Megatron-LM 'elapsed time per iteration (ms)'"
    first, second, *steady = m.iteration_times_s
    assert first >= FIRST_SLEEP_S
    assert second >= (FIRST_SLEEP_S + SLEEP_S) / 2  # not reset after the first line: it averages iterations 1-2
    assert all(SLEEP_S <= t < FIRST_SLEEP_S / 2 for t in steady), steady
    assert m.skipped_warmup == 2 and m.time_per_iteration_s == statistics.median(steady)
    # report_memory after iterations 1 and 2 and every --log-memory-interval: the largest is after iteration 8
    reports = lines_with(megatron_log, "memory (MB) | allocated:")
    assert [line.split("(after ")[1].split(" ")[0] for _, line in reports] == ["1", "2", "4", "8"]
    assert all("| total device memory used:" in line for _, line in reports)
    assert m.peak_allocated_bytes == megatron_memory_mib(8)["max_allocated"] * MIB
    assert m.peak_reserved_bytes == megatron_memory_mib(8)["max_reserved"] * MIB


def test_megatron_warmup_skipping(megatron_log):
    # The log up to the iteration-4 line: intervals {1}, {1, 2}, {3, 4}; only the last is steady.
    cut = megatron_log[: megatron_log.index("\n", megatron_log.index("iteration        4/")) + 1]
    m = parse_log(cut)
    assert len(m.iteration_times_s) == 3 and m.skipped_warmup == 2
    assert m.time_per_iteration_s == m.iteration_times_s[2] < FIRST_SLEEP_S / 2
    m0 = parse_log(cut, skip_warmup=0)
    assert m0.skipped_warmup == 0 and m0.time_per_iteration_s == m.iteration_times_s[1] > FIRST_SLEEP_S / 2
    # the first line alone: nothing to skip, at least one interval is kept
    first = megatron_log[: megatron_log.index("\n", megatron_log.index("iteration        1/")) + 1]
    m1 = parse_log(first)
    assert m1.skipped_warmup == 0 and m1.iterations == 1 and m1.time_per_iteration_s >= FIRST_SLEEP_S
    for bad in (3, -1):
        with pytest.raises(LogError, match=r"skip_warmup .* expected an integer from 0 to 2"):
            parse_log(cut, skip_warmup=bad)


# --- DeepSpeed ----------------------------------------------------------------------------------------------
def test_deepspeed_throughput_timer(ds_plain_log):
    m = parse_log(ds_plain_log, source="ds.log", train_batch_size=8)
    printed = lines_with(ds_plain_log, "CurrSamplesPerSec=")
    # ThroughputTimer reports from step start_step + 1 = 3 on
    assert [int(field(line, "global_step=", ",")) for _, line in printed] == [3, 4, 5, 6]
    assert m.framework == "deepspeed" and m.iterations == 6 and m.skipped_warmup == 0
    assert m.timing == "DeepSpeed train_batch_size / 'CurrSamplesPerSec'"
    assert m.iteration_times_s == tuple(8 / field(line, "CurrSamplesPerSec=", ",") for _, line in printed)
    assert m.time_per_iteration_s == statistics.median(m.iteration_times_s) > 0
    assert m.peak_allocated_bytes == max(field(line, "MaxMemAllocated=", "GB") for _, line in printed) * GIB > 0
    assert m.peak_reserved_bytes is None  # no see_memory_usage line


def test_deepspeed_throughput_needs_train_batch_size(ds_plain_log):
    first = lines_with(ds_plain_log, "CurrSamplesPerSec=")[0][0]
    with pytest.raises(LogError, match=rf"^log, line {first}: .*CurrSamplesPerSec.*expected train_batch_size") as err:
        parse_log(ds_plain_log)
    assert "pass train_batch_size" in str(err.value) and err.value.exit_code == EXIT_INVALID_INPUT
    with pytest.raises(LogError, match="train_batch_size 0; expected a positive integer"):
        parse_log(ds_plain_log, train_batch_size=0)


def test_deepspeed_wall_clock_breakdown_only(ds_plain_log):
    # At DeepSpeed's default log level (WARNING) its logger's INFO lines, the ThroughputTimer's among them,
    # are not printed; the wall_clock_breakdown lines are (print).
    text = "\n".join(line for line in ds_plain_log.split("\n") if "] [INFO] [" not in line)
    m = parse_log(text)
    printed = [line for _, line in lines_with(text, "time (ms) | fwd: ")]
    assert len(printed) == 6 and m.iterations == 6 and m.skipped_warmup == 2
    assert m.timing == "DeepSpeed wall_clock_breakdown fwd + bwd + step"
    expected = [(field(x, "| fwd:", "|") + field(x, "| bwd:", "|") + field(x, "| step:", "\n")) / 1000 for x in printed]
    assert m.iteration_times_s == pytest.approx(expected, rel=1e-12)
    assert m.time_per_iteration_s == statistics.median(m.iteration_times_s[2:])
    assert m.peak_allocated_bytes is None and m.peak_reserved_bytes is None


def test_deepspeed_see_memory_usage(ds_memory_log):
    m = parse_log(ds_memory_log)
    usage = [line for _, line in lines_with(ds_memory_log, "Max_MA ")]
    assert len(usage) >= 8  # two in deepspeed.initialize, before and after forward, backward and step
    tput = [line for _, line in lines_with(ds_memory_log, "MaxMemAllocated=")]
    allocated = [field(x, "MA ", "GB") for x in usage] + [field(x, "Max_MA ", "GB") for x in usage]
    allocated += [field(x, "MaxMemAllocated=", "GB") for x in tput] + [field(x, "MemAllocated=", "GB") for x in tput]
    reserved = [field(x, " CA ", "GB") for x in usage] + [field(x, "Max_CA ", "GB") for x in usage]
    assert m.peak_allocated_bytes == max(allocated) * GIB > 0
    assert m.peak_reserved_bytes == max(reserved) * GIB > 0
    # one step: too few for ThroughputTimer (from step 3 on), timed by its wall_clock_breakdown line
    assert m.iterations == 1 and len(m.iteration_times_s) == 1 and m.timing.endswith("fwd + bwd + step")


def test_deepspeed_pipeline_engine(ds_pipe_log):
    m = parse_log(ds_pipe_log)  # no train_batch_size needed: the pipeline line has the time itself
    printed = [line for _, line in lines_with(ds_pipe_log, "iter time (s):")]
    assert [int(field(x, "steps:", "loss")) for x in printed] == [1, 2, 3, 4, 5]
    assert m.framework == "deepspeed" and m.iterations == 5 and m.timing == "DeepSpeed pipeline 'iter time (s)'"
    assert m.iteration_times_s == tuple(field(x, "iter time (s):", "samples") for x in printed)
    assert m.skipped_warmup == 2 and m.time_per_iteration_s == statistics.median(m.iteration_times_s[2:]) > 0
    # the same steps printed every 2nd step: only the first interval (steps 1-2) is warm-up
    even = "\n".join(
        x for x in ds_pipe_log.split("\n") if "iter time (s):" not in x or int(field(x, "steps:", "loss")) % 2 == 0
    )
    assert parse_log(even).skipped_warmup == 1


def test_deepspeed_other_timer_lines_are_not_timing(ds_pipe_log):
    # Lines DeepSpeed prints next to the recognised ones, copied from their format strings (no CPU run prints
    # them): the MoE forward breakdown (deepspeed/runtime/engine.py:3068-3070) and ThroughputTimer's
    # monitor_memory line (deepspeed/utils/timer.py:278).
    extra = (
        "[Rank 0] time (ms) | fwd: 12.00 (fwd_moe: 3.00, 1st_a2a: 1.00, 2nd_a2a: 1.00, top_k: 0.50)\n"
        "epoch=0/micro_step=4/global_step=2, vm %: 12.5, swap %: 0.0\n"
    )
    same_measurement(parse_log(extra + ds_pipe_log), parse_log(ds_pipe_log))


# --- launcher prefixes, damaged logs ------------------------------------------------------------------------
PREFIXES = ["[default0]:", "0: ", "2026-11-27T13:00:00.123456Z ", "[default0]:[rank0]: "]
LOGS = ["megatron_log", "ds_plain_log", "ds_memory_log", "ds_pipe_log"]
BATCH = {"ds_plain_log": 8}  # DeepSpeed train_batch_size where the time comes from CurrSamplesPerSec


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("log", LOGS)
def test_launcher_prefixes(request, log, prefix):
    text = request.getfixturevalue(log)
    prefixed = "\n".join(prefix + line if line else line for line in text.split("\n"))
    batch = BATCH.get(log)
    same_measurement(parse_log(prefixed, train_batch_size=batch), parse_log(text, train_batch_size=batch))


TIMING_MARKER = {
    "megatron_log": "elapsed time per iteration (ms):",
    "ds_plain_log": "CurrSamplesPerSec=",
    "ds_pipe_log": "iter time (s):",
}


@pytest.mark.parametrize("log", sorted(TIMING_MARKER))
def test_truncated_last_line(request, log):
    text = request.getfixturevalue(log)
    number, line = lines_with(text, TIMING_MARKER[log])[-1]
    lines = text.split("\n")[:number]
    lines[-1] = line[: len(line) * 2 // 3]  # the process died while writing it
    with pytest.raises(LogError, match=rf"^log, line {number}: the log ends in the middle of this line: .*; expected"):
        parse_log("\n".join(lines), train_batch_size=BATCH.get(log))


GARBLE = {  # one number of one recognised line made unreadable
    "megatron_log": ("elapsed time per iteration (ms): ", "elapsed time per iteration (ms): 3O."),
    "ds_plain_log": ("CurrSamplesPerSec=", "CurrSamplesPerSec=x"),
    "ds_memory_log": ("Max_MA ", "Max_MA 1.2."),
    "ds_pipe_log": ("iter time (s): ", "iter time (s): 0.."),
}


@pytest.mark.parametrize("log", sorted(GARBLE))
def test_garbled_number(request, log):
    text = request.getfixturevalue(log)
    old, new = GARBLE[log]
    number, line = lines_with(text, old)[1]
    lines = text.split("\n")
    lines[number - 1] = line.replace(old, new)
    with pytest.raises(LogError, match=rf"^log, line {number}: cannot read this line: .*; expected a"):
        parse_log("\n".join(lines), train_batch_size=BATCH.get(log))


def test_megatron_memory_line_garbled(megatron_log):
    number, line = lines_with(megatron_log, "| max reserved: ")[0]
    lines = megatron_log.split("\n")
    lines[number - 1] = line.replace("| max reserved: ", "| max reserved: 12 |")
    with pytest.raises(LogError, match=rf"^log, line {number}: cannot read this line: .*report_memory"):
        parse_log("\n".join(lines))
    value = line.split("| max reserved: ")[1].split(" |")[0]
    lines[number - 1] = line.replace(f"| max reserved: {value}", "| max reserved: 1e999")
    with pytest.raises(LogError, match=rf"^log, line {number}: max_reserved = 1e999; expected a finite number >= 0"):
        parse_log("\n".join(lines))


@pytest.mark.parametrize("log", sorted(TIMING_MARKER))
def test_iterations_going_backwards(request, log):
    text = request.getfixturevalue(log)  # two runs' logs one after the other
    first_of_second = len(text.split("\n")) - 1 + lines_with(text, TIMING_MARKER[log])[0][0]
    with pytest.raises(
        LogError,
        match=rf"^log, line {first_of_second}: iteration \d+ after iteration \d+ "
        r"\(line \d+\); expected iteration numbers that increase",
    ):
        parse_log(text + text, train_batch_size=BATCH.get(log))


def test_empty_log():
    with pytest.raises(LogError, match=r"^run\.log \(empty, 0 lines\): no timing line found; expected") as err:
        parse_log("", source="run.log")
    assert "the log is empty" in str(err.value)
    with pytest.raises(LogError, match=r"^log, lines 1-3: no timing line found"):
        parse_log("\n \n\n")


def test_unknown_format():
    text = "Epoch 1/3\n100%|##########| 10/10 [00:01<00:00, 9.8it/s]\nloss 0.5\n"
    with pytest.raises(LogError) as err:
        parse_log(text, source="train.out")
    message = str(err.value)
    assert message.startswith("train.out, lines 1-3: no timing line found; expected")
    for looked_for in ("elapsed time per iteration (ms)", "iter time (s)", "CurrSamplesPerSec", "time (ms) | fwd:"):
        assert looked_for in message
    with pytest.raises(LogError, match="unknown framework 'jax'; expected one of megatron, deepspeed"):
        parse_log(text, framework="jax")


def test_framework_choice(megatron_log, ds_pipe_log):
    with pytest.raises(LogError, match=r"no timing line found; expected a DeepSpeed pipeline line"):
        parse_log(megatron_log, framework="deepspeed")
    with pytest.raises(LogError, match="both Megatron-LM and DeepSpeed timing lines found") as err:
        parse_log(megatron_log + ds_pipe_log)
    assert "framework='megatron'" in str(err.value)
    same_measurement(parse_log(megatron_log + ds_pipe_log, framework="megatron"), parse_log(megatron_log))
    same_measurement(parse_log(megatron_log + ds_pipe_log, framework="deepspeed"), parse_log(ds_pipe_log))


def test_read_log(tmp_path, ds_pipe_log):
    path = tmp_path / "train.log"
    path.write_text(ds_pipe_log.replace("\n", "\r\n"), newline="")
    m = read_log(path)
    assert m.source == str(path)
    same_measurement(m, parse_log(ds_pipe_log))
    with pytest.raises(LogError, match=r"cannot read training log file .*missing\.log"):
        read_log(tmp_path / "missing.log")
    binary = tmp_path / "binary.log"
    binary.write_bytes(b"\xff\xfe\x00iteration")
    with pytest.raises(LogError, match="is not a text file"):
        read_log(binary)
