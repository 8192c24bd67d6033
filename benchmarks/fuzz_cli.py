"""Whole command lines, hostile (issue 22): generated invocations of every command, and timed Ctrl-C.

Part 1 runs N generated command lines in this process (default 1,000): every command (`uniap plan`, `evaluate`,
`explain`, `compare`, `calibrate`, `convert megatron|deepspeed`, `uniap-megatron args`, `uniap-deepspeed
config`), each option given a sane value or a hostile one (zero, negative, NaN, infinite, huge, not a number,
empty), each file option a good file or a hostile one (empty, binary, deeply nested, a folder, a named pipe, a
dangling link, missing), each output a new path, an existing file, one of the command's inputs, a folder, a
named pipe or a link. A case fails when it exits 1 (a bug), leaves a traceback, exits with a code the README does
not document, runs past HANG_S, or changes a file of the user's it was not asked to write (with --force, an
existing output that is not an input may be replaced; nothing else).

Part 2 sends Ctrl-C to the real console command (`uniap plan`) after a delay spread over its start-up and its
work (default 100 signals); each must end with exit 130 and `uniap: interrupted`, or with the plan if it was
already done, never a traceback. A signal that lands while the interpreter itself starts, before any of uniap's
code runs, is counted apart: Python prints that traceback, not uniap.

Run: `python benchmarks/fuzz_cli.py [--cases N] [--signals N] [--seed S] [--json]`; it prints a table of cases
per command and outcome. No test is timed: tests/test_fuzz_inputs.py and tests/test_hostile_inputs.py hold the
classes in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from uniap.cli import main as uniap_main
from uniap.errors import EXIT_CODE_MEANINGS, EXIT_INTERNAL
from uniap.model.presets import model_preset
from uniap.model.spec import TrainingSpec
from uniap.planner import Job, plan
from uniap.cluster.spec import cluster_preset
from uniap_deepspeed.cli import main as deepspeed_main
from uniap_megatron.cli import main as megatron_main

HANG_S = 120.0  # a command line that takes longer than this is counted as a hang
SIGNAL_SPAN_S = 3.0  # Ctrl-C delays spread over 0 .. this: the interpreter's start, the imports, the search
TRACEBACK = "Traceback (most recent call last)"
INTEGERS = ["0", "-1", "1", "2", "3", "8", "1e3", "nan", "inf", "abc", "", "99999999999999999999", "1000000000", "4.5"]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e-9", "1e309", "abc", "", "5", "30"]
NAMES = ["", "abc", "../x", "megatron", "deepspeed", "generic", "llama2-7b", "gpt3-1.3b", "dgx-h100", "\u00e9\u00e9"]
INT_OPTIONS = ["--nodes", "--gpus-per-node", "--global-batch-size", "--seq-length", "--tp", "--pp", "--cp"]
INT_OPTIONS += ["--virtual-stages", "--micro-batch-size", "--offload-activations", "--zero"]
SWITCHES = ["--with-model", "--no-flash-attention", "--no-fused-kernels"]
KINDS = ["plan", "evaluate", "explain", "compare", "calibrate", "convert-megatron", "convert-deepspeed"]
KINDS += ["megatron-args", "deepspeed-config"]
MEGATRON_SCRIPT = """#!/bin/bash
GPUS_PER_NODE=8
torchrun --nproc_per_node $GPUS_PER_NODE --nnodes 1 pretrain_gpt.py \\
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \\
    --max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 256 --bf16 \\
    --tensor-model-parallel-size 2 --vocab-size 50304
"""
DEEPSPEED_CONFIG = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}}


@dataclass
class Case:
    command: str
    argv: list[str]
    code: int | None
    seconds: float
    problem: str | None


def _digest(path: Path) -> str | None:
    """What a file of the user's is: its content's hash, or its kind for anything but a regular file."""
    try:
        info = path.lstat()
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "link:" + os.readlink(path)
    if stat.S_ISFIFO(info.st_mode):
        return "fifo"
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixtures(root: Path) -> None:
    """The user's files a case may read or be pointed at."""
    made, _ = plan(
        Job(
            model=model_preset("gpt3-1.3b"),
            cluster=cluster_preset("dgx-h100").with_shape(1, 8),
            training=TrainingSpec(global_batch_size=16, seq_length=512),
            target="megatron",
        ),
        progress=False,
    )
    made.save(root / "plan.json")
    (root / "model.json").write_text(json.dumps(model_preset("gpt3-1.3b").to_dict()))
    (root / "cluster.json").write_text(json.dumps(cluster_preset("dgx-h100").to_dict()))
    (root / "train.sh").write_text(MEGATRON_SCRIPT)
    (root / "ds_config.json").write_text(json.dumps(DEEPSPEED_CONFIG))
    (root / "empty.json").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "deep.json").write_text("[" * 5000 + "]" * 5000)
    (root / "notjson.json").write_text("{not json")
    line = (
        " [2026-12-07 10:00:00] iteration {it:8d}/{n:8d} | consumed samples: {samples:12d} | elapsed time per "
        "iteration (ms): {ms:.1f} | learning rate: 1.0E-04 | global batch size: {gbs:5d} | loss scale: 1.0 | "
        "number of skipped iterations:   0 | number of nan iterations:   0 |\n"
    )
    ms = made.time_per_iteration * 1100.0  # 10 % slower than predicted: a log calibrate fits
    lines = (line.format(it=it, n=100, samples=it * 16, ms=ms + it, gbs=16) for it in range(1, 21))
    (root / "log.txt").write_text("".join(lines))
    (root / "folder").mkdir()
    os.mkfifo(root / "pipe")
    (root / "link.json").symlink_to(root / "plan.json")
    (root / "dangling.json").symlink_to(root / "nowhere.json")


INPUT_FILES = ["plan.json", "model.json", "cluster.json", "empty.json", "binary.bin", "deep.json", "notjson.json"]
INPUT_FILES += ["folder", "pipe", "dangling.json", "missing.json", "link.json"]
OUTPUT_OPTIONS = ("-o", "--output", "--save-plan", "--plot")
OUTPUTS = ["out.json", "plan.json", "model.json", "folder", "folder/", "pipe", "link.json", "new/sub/out.json", ""]


class Generator:
    """Random command lines: a sane base for each command, three in four with one to three options made hostile."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, values):
        return self.rng.choice(values)

    def mutate(self, argv: list[str], options: list[str]) -> list[str]:
        """`argv` with one to three of `options` given a hostile value (or a sane one), maybe --force, --json."""
        for _ in range(self.rng.randint(1, 3)):
            option = self.pick(options)
            if option in SWITCHES:
                argv = [a for a in argv if a != option] if option in argv else [*argv, option]
                continue
            if option in INT_OPTIONS:
                value = self.pick(INTEGERS)
            elif option in ("--time-limit", "--gap"):
                value = self.pick(FLOATS)
            elif option in ("--model", "--cluster", "--profile", "--plan", "--base"):
                value = self.pick(INPUT_FILES + NAMES)
            elif option in OUTPUT_OPTIONS:
                value = self.pick(OUTPUTS)
            else:
                value = self.pick(NAMES)
            if option in argv:
                argv[argv.index(option) + 1] = value
            else:
                argv += [option, value]
        if self.rng.random() < 0.3:
            argv.append("--force")
        if self.rng.random() < 0.3:
            argv.append("--json")
        return argv

    def case(self) -> tuple[str, list[str]]:
        job = ["--model", "gpt3-1.3b", "--nodes", "1", "--gpus-per-node", "8", "--global-batch-size", "16"]
        job += ["--seq-length", "512", "--target", "megatron"]
        kind = self.pick(KINDS)
        if kind == "plan":
            argv = ["plan", *job, "--time-limit", "20"]
            options = ["--model", "--cluster", "--target", "--time-limit", "--gap", "-o", *INT_OPTIONS, *SWITCHES[1:]]
        elif kind == "evaluate":
            argv = ["evaluate", *job]
            options = ["--model", "--cluster", "--target", "--plan", "--split", "-o", *INT_OPTIONS]
        elif kind == "explain":
            argv = ["explain", "plan.json"]
            options = ["--profile", "--plot"]
        elif kind == "compare":
            argv = ["compare", "plan.json", self.pick(["plan.json"] * 3 + INPUT_FILES)]
            options = ["--plot"]
        elif kind == "calibrate":
            log = self.pick(["log.txt"] * 3 + INPUT_FILES)
            argv = ["calibrate", "--log", log, "--plan", "plan.json", "-o", "prof.json"]
            options = ["--plan", "--profile", "-o"]
        elif kind == "convert-megatron":
            argv = ["convert", "megatron", self.pick(["train.sh"] * 3 + INPUT_FILES), "--time-limit", "20"]
            options = ["--nodes", "--gpus-per-node", "--cluster", "--time-limit", "--keep", "-o"]
        elif kind == "convert-deepspeed":
            argv = ["convert", "deepspeed", self.pick(["ds_config.json"] * 3 + INPUT_FILES), "--model", "gpt3-1.3b"]
            argv += ["--nodes", "1", "--gpus-per-node", "8", "--seq-length", "512", "--time-limit", "20"]
            options = ["--nodes", "--gpus-per-node", "--model", "--seq-length", "--time-limit", "-o"]
        elif kind == "megatron-args":
            argv = ["args", self.pick(["plan.json"] * 3 + INPUT_FILES), "--with-model"]
            options = SWITCHES[:1]
        else:
            argv = ["config", *job[:-2], "-o", "ds.json", "--time-limit", "20"]
            options = ["--plan", "--base", "-o", "--save-plan", "--zero-stage", "--time-limit", *INT_OPTIONS[:4]]
        return kind, self.mutate(argv, options) if self.rng.random() < 0.75 else argv


def run_case(kind: str, argv: list[str], root: Path) -> Case:
    """One command line in a fresh copy of the user's files; what it returned and what went wrong."""
    work = Path(tempfile.mkdtemp(dir=root))
    for name in os.listdir(root / "template"):
        source, target = root / "template" / name, work / name
        if source.is_symlink():
            target.symlink_to(os.readlink(source).replace(str(root / "template"), str(work)))
        elif stat.S_ISFIFO(source.lstat().st_mode):
            os.mkfifo(target)
        elif source.is_dir():
            target.mkdir()
        else:
            shutil.copy2(source, target)
    before = {name: _digest(work / name) for name in os.listdir(work)}
    entry = {"megatron-args": megatron_main, "deepspeed-config": deepspeed_main}.get(kind, uniap_main)
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    started = time.perf_counter()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry(list(argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
            except BaseException as exc:  # noqa: BLE001 - anything escaping a command is what this looks for
                code, err = None, io.StringIO(f"{TRACEBACK}\n{type(exc).__name__}: {exc}")
    finally:
        os.chdir(here)
    seconds = time.perf_counter() - started
    problem = None
    text = err.getvalue()
    if TRACEBACK in text or code is None:
        problem = "traceback: " + text.strip().splitlines()[-1][:160]
    elif code == EXIT_INTERNAL:
        problem = "exit 1: " + text.strip()[:160]
    elif code not in EXIT_CODE_MEANINGS:
        problem = f"undocumented exit {code}"
    elif seconds > HANG_S:
        problem = f"ran {seconds:.0f} s"
    forced = "--force" in argv
    outputs = {argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS}
    for name, digest in before.items():
        if problem is None and _digest(work / name) != digest:
            allowed = forced and name in outputs and digest not in ("fifo", "dir") and not digest.startswith("link:")
            if not allowed:
                problem = f"changed the user's {name}"
    shutil.rmtree(work, ignore_errors=True)
    return Case(kind, argv, code, seconds, problem)


def timed_signals(count: int, rng: random.Random, root: Path) -> list[dict]:
    """Ctrl-C to `uniap plan` after delays spread over start-up and work; what each run ended with."""
    command = shutil.which("uniap") or str(Path(sys.executable).parent / "uniap")
    # About 8 s on 2 cores: the signals land in the interpreter's start, the imports and the search alike.
    job = ["plan", "--model", "llama2-70b", "--nodes", "4", "--global-batch-size", "512", "--seq-length", "4096"]
    job += ["--target", "megatron"]
    results = []
    for i in range(count):
        delay = (i + rng.random()) / count * SIGNAL_SPAN_S
        proc = subprocess.Popen(
            [command, *job, "-o", str(root / f"signal-{i}.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            # As from a terminal: a shell's background job (this benchmark under nohup ... &) ignores SIGINT, and
            # a child would inherit that and never see the Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            results.append({"delay_s": delay, "outcome": "hang"})
            continue
        if TRACEBACK in err:
            own = "uniap" in err.split(TRACEBACK, 1)[1]
            outcome = "traceback (uniap)" if own else "traceback (interpreter start-up)"
        elif proc.returncode == 130 and "interrupted" in err:
            outcome = "interrupted, exit 130"
        elif proc.returncode == -signal.SIGINT:
            outcome = "killed before Python's handler (no output)"
        elif proc.returncode == 0:
            outcome = "finished first"
        else:
            outcome = f"exit {proc.returncode}"
        half = (root / f"signal-{i}.json").exists() and proc.returncode != 0
        tail = err.strip().splitlines()[-3:] if err.strip() else []
        results.append({"delay_s": delay, "outcome": "left a file" if half else outcome, "stderr_tail": tail})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--signals", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    generator = Generator(rng)
    root = Path(tempfile.mkdtemp(prefix="uniap-fuzz-"))
    (root / "template").mkdir()
    fixtures(root / "template")
    started = time.perf_counter()
    cases = []
    for i in range(args.cases):
        cases.append(run_case(*generator.case(), root))
        if not args.json and (i + 1) % 100 == 0:
            print(f"  {i + 1} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    signals = timed_signals(args.signals, rng, root)
    shutil.rmtree(root, ignore_errors=True)
    failures = [c for c in cases if c.problem]
    own = [s for s in signals if s["outcome"] in ("hang", "left a file", "traceback (uniap)")]
    if args.json:
        print(json.dumps({"cases": [asdict(c) for c in cases], "signals": signals}, indent=1))
        return 1 if failures or own else 0
    print(f"1. {len(cases)} generated command lines (seed {args.seed}), {time.perf_counter() - started:.0f} s")
    codes = Counter((c.command, c.code) for c in cases)
    print(f"  {'command':<18} " + " ".join(f"{'exit ' + str(k):>8}" for k in sorted(EXIT_CODE_MEANINGS)))
    for command in sorted({c.command for c in cases}):
        row = " ".join(f"{codes[(command, k)]:>8}" for k in sorted(EXIT_CODE_MEANINGS))
        print(f"  {command:<18} {row}")
    if cases:
        slowest = max(cases, key=lambda c: c.seconds)
        print(f"  slowest: {slowest.seconds:.1f} s ({slowest.command} {' '.join(slowest.argv)[:100]})")
    print(f"  failures: {len(failures)} (exit 1, traceback, undocumented exit, > {HANG_S:.0f} s, user file changed)")
    for c in failures[:20]:
        print(f"    {c.command}: {c.problem} <- {' '.join(c.argv)[:140]}")
    print(f"\n2. {len(signals)} timed Ctrl-C to `uniap plan` (delays 0-{SIGNAL_SPAN_S:.0f} s)")
    for outcome, n in Counter(s["outcome"] for s in signals).most_common():
        print(f"  {n:>4}  {outcome}")
    for s in signals:
        if s["outcome"] not in ("interrupted, exit 130", "killed before Python's handler (no output)"):
            print(f"    at {s['delay_s']:.2f} s: {s['outcome']}: {' | '.join(s['stderr_tail'])[:200]}")
    return 1 if failures or own else 0


if __name__ == "__main__":
    sys.exit(main())
