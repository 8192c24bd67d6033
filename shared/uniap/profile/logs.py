"""Measured time per iteration and peak memory from a Megatron-LM or DeepSpeed training log (`uniap calibrate`).

Only the lines below are read, in the exact form the frameworks print them; every other line is ignored.
Anything a launcher puts before them is accepted (torchrun --tee "[default0]:", srun -l "0: ", timestamps).

Megatron-LM core_v0.16.1
- megatron/training/training.py:2033-2088 `training_log`, via `print_rank_last` (last rank) every
  --log-interval iterations and once after the first iteration of a run:
  " [<date time>] iteration {:8d}/{:8d} | consumed samples: ... | elapsed time per iteration (ms): {:.1f} |
  ... | number of nan iterations: {:3d} |". The time is the interval's wall time over its iterations.
- megatron/training/utils.py:279-292 `report_memory`, called by `training_log` (training.py:2090-2103) after
  the first two iterations and every --log-memory-interval, and around checkpoint saves (training.py:2200):
  "[Rank {r}] {name} memory (MB) | allocated: {:.2f} | max allocated: {:.2f} | reserved: {:.2f} |
  max reserved: {:.2f}[ | total device memory used: {:.2f}]", MB = 2**20 bytes.

DeepSpeed 0.19.8
- deepspeed/runtime/pipe/engine.py:380-387 `PipelineEngine.train_batch`, every steps_per_print steps:
  "steps: {} loss: {:0.4f} [<name>: {:0.4f} ]iter time (s): {:0.3f} samples/sec: {:0.3f}", the mean time of
  the steps since the last print.
- deepspeed/utils/timer.py:264-274 `ThroughputTimer.stop` (the engine's tput_timer, runtime/engine.py:637),
  every steps_per_print steps from step start_step + 1 = 3 on, through `logger.info`, so only at log level
  info (the config's "log_level"): "epoch={}/micro_step={}/global_step={}, RunningAvgSamplesPerSec={},
  CurrSamplesPerSec={}, MemAllocated={}GB, MaxMemAllocated={}GB". CurrSamplesPerSec is train_batch_size over
  the last step's time (forward start to optimizer step end), so the time needs `train_batch_size`.
- deepspeed/utils/timer.py:141-151 `SynchronizedWallClockTimer.log` with wall_clock_breakdown, each step of
  the engine (runtime/engine.py:3677, global timers summed over the step's micro-batches):
  "[Rank {r}] time (ms) | fwd: {:.2f} | bwd: {:.2f} | bwd_inner: {:.2f} | bwd_allreduce: {:.2f} | step: {:.2f}".
  Used only when neither line above is in the log: fwd + bwd + step, which leaves out the time spent
  between the engine's calls (data loading, the loss outside the model).
- deepspeed/runtime/utils.py:828-842 `see_memory_usage` (force=True, e.g. with "memory_breakdown"):
  "MA {} GB         Max_MA {} GB         CA {} GB         Max_CA {} GB " (GB = 2**30 bytes; values rounded
  to 0.01 GB, Max_CA to whole GB, so the reserved peak is the largest of CA and Max_CA).

The time per iteration is the median of the logged intervals after the warm-up ones: by default the
intervals that include either of the first two iterations of the run (Megatron-LM's second line still
averages in the first iteration, since the first call of `training_log` does not reset its timer,
training.py:1797 and 2016), none for ThroughputTimer lines (DeepSpeed already leaves out start_step = 2
steps), and at least one interval is always kept.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UniapError
from ..io import read_text

FRAMEWORKS = ("megatron", "deepspeed")
MIB = 2.0**20
GIB = 2.0**30
WARMUP_ITERATIONS = 2  # a run's first iterations, as DeepSpeed's ThroughputTimer start_step (utils/timer.py:201)

# A number as the frameworks format it ("{:.1f}", "{:.2f}", str(float), round(x, 2)).
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# A value that may legitimately be nan/inf (a loss, DeepSpeed's running average before any timed step).
ANY_NUMBER = rf"(?:{NUMBER}|[-+]?(?:inf|nan))"

# Megatron-LM core_v0.16.1 training_log; the anchor is what marks a line as one (the full line must follow).
MEGATRON_ITERATION_ANCHOR = re.compile(r"(?<!\w)iteration\s+[^\s|/]+/")
MEGATRON_ITERATION = re.compile(
    rf"iteration\s+(?P<iteration>\d+)/\s*(?P<train_iters>\d+) \|"
    rf".*? elapsed time per iteration \(ms\): (?P<ms>{NUMBER}) \|"
    rf".* number of nan iterations:\s*\d+ \|\s*$"
)
# Megatron-LM core_v0.16.1 report_memory.
MEGATRON_MEMORY_ANCHOR = re.compile(r"\[Rank [^\]]*\] .*\bmemory \(MB\)")
MEGATRON_MEMORY = re.compile(
    rf"\[Rank \d+\] .*\bmemory \(MB\) \| allocated: (?P<allocated>{NUMBER}) \| max allocated: (?P<max_allocated>"
    rf"{NUMBER}) \| reserved: (?P<reserved>{NUMBER}) \| max reserved: (?P<max_reserved>{NUMBER})"
    rf"(?: \| total device memory used: {NUMBER})?\s*$"
)
# DeepSpeed 0.19.8 PipelineEngine.train_batch.
DEEPSPEED_PIPE_ANCHOR = re.compile(r"(?<!\w)steps: \S+ loss: ")
DEEPSPEED_PIPE = re.compile(
    rf"steps: (?P<iteration>\d+) loss: {ANY_NUMBER} (?:.*? )?iter time \(s\): (?P<seconds>{NUMBER}) "
    rf"samples/sec: (?P<samples_per_s>{NUMBER})\s*$"
)
# DeepSpeed 0.19.8 ThroughputTimer.stop; its monitor_memory line ("..., vm %: ...") is not a timing line.
DEEPSPEED_THROUGHPUT_ANCHOR = re.compile(r"(?<!\w)epoch=[^\s/]*/micro_step=")
DEEPSPEED_THROUGHPUT_VM = re.compile(r"global_step=\d+, vm %: ")
DEEPSPEED_THROUGHPUT = re.compile(
    rf"epoch=\d+/micro_step=\d+/global_step=(?P<iteration>\d+), RunningAvgSamplesPerSec={ANY_NUMBER}, "
    rf"CurrSamplesPerSec=(?P<samples_per_s>{NUMBER}), MemAllocated=(?P<allocated>{NUMBER})GB, "
    rf"MaxMemAllocated=(?P<max_allocated>{NUMBER})GB\s*$"
)
# DeepSpeed 0.19.8 SynchronizedWallClockTimer.log of the engine's global timers (the micro-step line has
# "fwd_microstep:"; the MoE breakdown line of runtime/engine.py:3069 "fwd: ... (fwd_moe: ...)" is not one).
DEEPSPEED_TIMERS_ANCHOR = re.compile(r"time \(ms\) \| fwd: ")
DEEPSPEED_TIMERS_MOE = re.compile(r"time \(ms\) \| fwd: \S+ \(fwd_moe: ")
DEEPSPEED_TIMERS = re.compile(rf"time \(ms\)(?P<timers>(?: \| \w+: {NUMBER})+)\s*$")
DEEPSPEED_TIMER = re.compile(rf"(\w+): ({NUMBER})")
# DeepSpeed 0.19.8 see_memory_usage.
DEEPSPEED_MEMORY_ANCHOR = re.compile(r"(?<!\w)MA \S+ GB")
DEEPSPEED_MEMORY = re.compile(
    rf"MA (?P<allocated>{NUMBER}) GB\s+Max_MA (?P<max_allocated>{NUMBER}) GB\s+CA (?P<reserved>{NUMBER}) GB"
    rf"\s+Max_CA (?P<max_reserved>{NUMBER}) GB\s*$"
)


class LogError(UniapError):
    """A training log that cannot be read as Megatron-LM or DeepSpeed output; names source, line, expectation."""


@dataclass(frozen=True)
class LogMeasurement:
    """What a training log measured. `timing` says which lines the times come from."""

    framework: str
    iteration_times_s: tuple[float, ...]
    time_per_iteration_s: float
    skipped_warmup: int
    peak_allocated_bytes: float | None
    peak_reserved_bytes: float | None
    iterations: int
    source: str
    timing: str
    # Every timed interval includes the run's warm-up iterations (the median is then of warm-up time).
    warmup_only: bool = False


@dataclass(frozen=True)
class _Record:
    """One kind of line: `anchor` marks a line as one (unless `exclude` matches), `pattern` is the whole record
    from the anchor on; `memory_unit`: bytes per unit of its allocated/reserved fields (None: it has none)."""

    kind: str
    framework: str
    anchor: re.Pattern[str]
    pattern: re.Pattern[str]
    expected: str
    exclude: re.Pattern[str] | None = None
    memory_unit: float | None = None


RECORDS = (
    _Record(
        "megatron_iteration",
        "megatron",
        MEGATRON_ITERATION_ANCHOR,
        MEGATRON_ITERATION,
        "a Megatron-LM training_log line ' iteration N/ M | consumed samples: ... | elapsed time per iteration "
        "(ms): X | ... | number of nan iterations: K |'",
    ),
    _Record(
        "megatron_memory",
        "megatron",
        MEGATRON_MEMORY_ANCHOR,
        MEGATRON_MEMORY,
        "a Megatron-LM report_memory line '[Rank R] ... memory (MB) | allocated: X | max allocated: X | "
        "reserved: X | max reserved: X'",
        memory_unit=MIB,
    ),
    _Record(
        "deepspeed_pipe",
        "deepspeed",
        DEEPSPEED_PIPE_ANCHOR,
        DEEPSPEED_PIPE,
        "a DeepSpeed pipeline line 'steps: N loss: X iter time (s): X samples/sec: X'",
    ),
    _Record(
        "deepspeed_throughput",
        "deepspeed",
        DEEPSPEED_THROUGHPUT_ANCHOR,
        DEEPSPEED_THROUGHPUT,
        "a DeepSpeed ThroughputTimer line 'epoch=E/micro_step=M/global_step=N, RunningAvgSamplesPerSec=X, "
        "CurrSamplesPerSec=X, MemAllocated=XGB, MaxMemAllocated=XGB'",
        DEEPSPEED_THROUGHPUT_VM,
        GIB,
    ),
    _Record(
        "deepspeed_timers",
        "deepspeed",
        DEEPSPEED_TIMERS_ANCHOR,
        DEEPSPEED_TIMERS,
        "a DeepSpeed wall_clock_breakdown line 'time (ms) | fwd: X | bwd: X | ... | step: X'",
        DEEPSPEED_TIMERS_MOE,
    ),
    _Record(
        "deepspeed_memory",
        "deepspeed",
        DEEPSPEED_MEMORY_ANCHOR,
        DEEPSPEED_MEMORY,
        "a DeepSpeed see_memory_usage line 'MA X GB  Max_MA X GB  CA X GB  Max_CA X GB'",
        memory_unit=GIB,
    ),
)
TIMING_KINDS = {
    "megatron": ("megatron_iteration",),
    "deepspeed": ("deepspeed_pipe", "deepspeed_throughput", "deepspeed_timers"),
}
TIMING_BASIS = {
    "megatron_iteration": "Megatron-LM 'elapsed time per iteration (ms)'",
    "deepspeed_pipe": "DeepSpeed pipeline 'iter time (s)'",
    "deepspeed_throughput": "DeepSpeed train_batch_size / 'CurrSamplesPerSec'",
    "deepspeed_timers": "DeepSpeed wall_clock_breakdown fwd + bwd + step",
}


@dataclass(frozen=True)
class _Entry:
    """One timing line: its line number, iteration number (None: not printed) and value."""

    line: int
    iteration: int | None
    value: float


@dataclass
class _Scan:
    """What one framework's lines in a log hold."""

    series: dict[str, list[_Entry]]
    allocated: float | None = None
    reserved: float | None = None


def parse_log(
    text: str,
    source: str = "log",
    framework: str | None = None,
    skip_warmup: int | None = None,
    train_batch_size: int | None = None,
) -> LogMeasurement:
    """Time per iteration and peak memory from a training log's text (see the module docstring).

    `framework`: "megatron", "deepspeed" or None (detected). `skip_warmup`: leading intervals to leave out of
    the median (None: the warm-up intervals). `train_batch_size`: DeepSpeed's global batch, needed only when
    the time comes from CurrSamplesPerSec. Raises LogError naming the source, the line and what was expected."""
    if framework is not None and framework not in FRAMEWORKS:
        raise LogError(f"{source}: unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    if train_batch_size is not None and (
        isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int) or train_batch_size < 1
    ):
        raise LogError(f"{source}: train_batch_size {train_batch_size!r}; expected a positive integer")
    lines = text.split("\n")
    cut = bool(text) and not text.endswith("\n")  # the last line may stop in the middle of a record
    candidates = (framework,) if framework else FRAMEWORKS
    scans = {name: _Scan({kind: [] for kind in TIMING_KINDS[name]}) for name in candidates}
    for number, line in enumerate(lines, start=1):
        _read_line(line.rstrip("\r"), number, source, scans, cut and number == len(lines))
    found = [name for name in candidates if any(scans[name].series.values())]
    last = len(lines) - (not cut)
    where = f"{source}, lines 1-{last}" if last > 0 else f"{source} (empty, 0 lines)"
    if not found:
        looked_for = "; ".join(
            r.expected for r in RECORDS if r.framework in candidates and r.kind in TIMING_KINDS[r.framework]
        )
        raise LogError(
            f"{where}: no timing line found; expected {looked_for}",
            hint=None if text.strip() else "the log is empty: was the right file given?",
        )
    if len(found) > 1:
        raise LogError(
            f"{where}: both Megatron-LM and DeepSpeed timing lines found; expected one framework's log",
            hint="pass framework='megatron' or framework='deepspeed'",
        )
    name = found[0]
    scan = scans[name]
    kind = next(k for k in TIMING_KINDS[name] if scan.series[k])
    entries = scan.series[kind]
    times = _times(kind, entries, source, train_batch_size)
    skip = _warmup(kind, entries) if skip_warmup is None else skip_warmup
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < len(times):
        raise LogError(
            f"{source}: skip_warmup {skip_warmup!r} with {len(times)} timed intervals "
            f"({TIMING_BASIS[kind]}, lines {entries[0].line}-{entries[-1].line}); "
            f"expected an integer from 0 to {len(times) - 1}"
        )
    median = statistics.median(times[skip:])
    if not median > 0:
        raise LogError(
            f"{source}, lines {entries[skip].line}-{entries[-1].line}: the median time per iteration "
            f"is {median} s ({TIMING_BASIS[kind]}); expected a positive time",
            hint="iterations shorter than the printed precision cannot be measured from this log",
        )
    iterations = entries[-1].iteration if entries[-1].iteration is not None else len(entries)
    return LogMeasurement(
        framework=name,
        iteration_times_s=tuple(times),
        time_per_iteration_s=median,
        skipped_warmup=skip,
        peak_allocated_bytes=scan.allocated,
        peak_reserved_bytes=scan.reserved,
        iterations=iterations,
        source=source,
        timing=TIMING_BASIS[kind],
        warmup_only=skip_warmup is None and len(times) <= _warmup(kind, entries, clamp=False),
    )


def read_log(
    path: str | Path, framework: str | None = None, skip_warmup: int | None = None, train_batch_size: int | None = None
) -> LogMeasurement:
    """`parse_log` of a log file; an unreadable or non-UTF-8 file raises LogError naming it."""
    path = Path(path)
    text = read_text(path, "training log", error=LogError)
    return parse_log(
        text, source=str(path), framework=framework, skip_warmup=skip_warmup, train_batch_size=train_batch_size
    )


def _read_line(line: str, number: int, source: str, scans: dict[str, _Scan], maybe_cut: bool) -> None:
    """Record what `line` holds for each framework in `scans`; a recognised but malformed line raises."""
    for record in RECORDS:
        scan = scans.get(record.framework)
        if scan is None:
            continue
        anchor = record.anchor.search(line)
        if anchor is None or (record.exclude is not None and record.exclude.search(line)):
            continue
        match = record.pattern.match(line, anchor.start())
        if match is None:
            problem = "the log ends in the middle of this line" if maybe_cut else "cannot read this line"
            raise LogError(f"{source}, line {number}: {problem}: {_clip(line)!r}; expected {record.expected}")
        values = {
            key: _number(text, key, record, source, number)
            for key, text in match.groupdict().items()
            if key not in ("iteration", "train_iters", "timers") and text is not None
        }
        if record.memory_unit is not None:  # the current value too: DeepSpeed rounds Max_CA to whole GB
            allocated = max(values["allocated"], values["max_allocated"]) * record.memory_unit
            scan.allocated = allocated if scan.allocated is None else max(scan.allocated, allocated)
            if "reserved" in values:
                reserved = max(values["reserved"], values["max_reserved"]) * record.memory_unit
                scan.reserved = reserved if scan.reserved is None else max(scan.reserved, reserved)
        if record.kind in scan.series:
            iteration = int(match["iteration"]) if "iteration" in match.groupdict() else None
            value = _timing_value(record, match, values, source, number)
            series = scan.series[record.kind]
            if iteration is not None and series and iteration <= series[-1].iteration:
                previous = series[-1]
                raise LogError(
                    f"{source}, line {number}: iteration {iteration} after iteration {previous.iteration} "
                    f"(line {previous.line}); expected iteration numbers that increase",
                    hint="the log holds more than one run (a restart?): give the part of one run",
                )
            series.append(_Entry(number, iteration, value))


def _timing_value(record: _Record, match: re.Match[str], values: dict[str, float], source: str, number: int) -> float:
    """The timing line's value: seconds per iteration, or samples/s for ThroughputTimer lines."""
    if record.kind == "megatron_iteration":
        return values["ms"] / 1000.0
    if record.kind == "deepspeed_pipe":
        return values["seconds"]
    if record.kind == "deepspeed_throughput":
        return values["samples_per_s"]
    timers = {name: float(value) for name, value in DEEPSPEED_TIMER.findall(match["timers"])}
    missing = [name for name in ("fwd", "bwd", "step") if name not in timers]
    if missing or not all(math.isfinite(v) and v >= 0 for v in timers.values()):
        raise LogError(
            f"{source}, line {number}: wall_clock_breakdown timers {sorted(timers)}"
            f"{' without ' + ', '.join(missing) if missing else ' with a bad value'}; "
            f"expected {record.expected}"
        )
    return (timers["fwd"] + timers["bwd"] + timers["step"]) / 1000.0


def _number(text: str, key: str, record: _Record, source: str, number: int) -> float:
    """A time, rate or memory field: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise LogError(f"{source}, line {number}: {key} = {text}; expected a finite number >= 0 in {record.expected}")
    return value


def _times(kind: str, entries: list[_Entry], source: str, train_batch_size: int | None) -> list[float]:
    """Seconds per iteration of each logged interval."""
    if kind != "deepspeed_throughput":
        return [e.value for e in entries]
    if train_batch_size is None:
        raise LogError(
            f"{source}, line {entries[0].line}: DeepSpeed's timing here is ThroughputTimer's "
            f"CurrSamplesPerSec (samples/s); expected train_batch_size to turn it into seconds per "
            f"iteration, and none was given",
            hint="pass train_batch_size (the DeepSpeed config's train_batch_size)",
        )
    for e in entries:
        if not e.value > 0:
            raise LogError(f"{source}, line {e.line}: CurrSamplesPerSec={e.value}; expected a positive rate")
    return [train_batch_size / e.value for e in entries]


def _warmup(kind: str, entries: list[_Entry], clamp: bool = True) -> int:
    """Leading intervals that include either of the run's first WARMUP_ITERATIONS iterations (at least one
    interval is kept unless not `clamp`)."""
    if kind == "deepspeed_throughput":
        skip = 0  # ThroughputTimer times only the steps after its start_step
    elif kind == "megatron_iteration":
        skip = WARMUP_ITERATIONS  # the first-iteration line, then an interval that still includes it
    elif kind == "deepspeed_timers":
        skip = WARMUP_ITERATIONS  # one line per step
    else:  # pipeline: an interval runs from the previous printed step to its own
        skip = 1
        while skip < len(entries) and entries[skip - 1].iteration < WARMUP_ITERATIONS:
            skip += 1
    return min(skip, len(entries) - 1) if clamp else skip


def _clip(line: str, width: int = 160) -> str:
    line = line.strip()
    return line if len(line) <= width else line[: width - 3] + "..."
