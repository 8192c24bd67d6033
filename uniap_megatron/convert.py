"""`uniap convert megatron`: an existing Megatron-LM launch priced as it is, planned, and written back converted.

The launch is a script (read as bash reads it, uniap.shell: continuations, variables, arrays, `export`) or the
arguments after `--`. Its training command is the first one that runs a `.py` file under torchrun, `python -m
torch.distributed.run`, the deepspeed launcher, srun or python. From it: the model, the batch and the current
parallel settings (Megatron's defaults where a flag is absent), the cluster's shape from the launcher's
arguments (or --nodes / --gpus-per-node), its hardware from --cluster. The current configuration is priced with
the same cost model as the plan (time per iteration, tokens/s, MFU, peak memory per GPU, whether it fits); the
plan keeps what --keep names. The converted script is written beside the original (never over it): every
parallel flag edited where the user wrote it (an array element, a variable's assignment, the command line),
flags the plan drops removed, new ones appended to the training command; every other byte kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from uniap import shell
from uniap.launch import Launch, read_launch
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
from uniap.io import line_ending, read_text, write_text_atomic

from . import flags as F
from .args import job_from_args
from .capability import MEGATRON
from .merge import merged_argv

PROG = "uniap convert megatron"
# The choices --keep can hold fixed, and the flags that carry each.
KEEP = {
    "tp": (F.TENSOR_PARALLEL,),
    "cp": (F.CONTEXT_PARALLEL,),
    "pp": (F.PIPELINE_PARALLEL, F.FIRST_STAGE_LAYERS, F.LAST_STAGE_LAYERS, F.PIPELINE_LAYOUT),
    "vpp": (F.VIRTUAL_STAGES_PER_RANK,),
    "mbs": (F.MICRO_BATCH_SIZE,),
    "zero": (F.DISTRIBUTED_OPTIMIZER, F.MEGATRON_FSDP, F.TORCH_FSDP2, F.SHARDING_STRATEGY),
    "recompute": (F.RECOMPUTE_GRANULARITY, F.RECOMPUTE_ACTIVATIONS, F.RECOMPUTE_METHOD, F.RECOMPUTE_NUM_LAYERS),
    "offload": (F.CPU_OFFLOADING_LAYERS,),
}
# The flags a conversion may change: the parallel strategy (not the batch, the precision or the model).
STRATEGY_FLAGS = tuple(f for flags in KEEP.values() for f in flags) + (
    F.SEQUENCE_PARALLEL,
    F.OVERLAP_GRAD_REDUCE,
    F.OVERLAP_PARAM_GATHER,
    F.TP_COMM_OVERLAP,
)
STRATEGY_SPELLINGS = {f.spelling: f for f in STRATEGY_FLAGS}


@dataclass
class Item:
    """One argument of the training script: a flag, its words, its value."""

    flag: str
    words: list[shell.Word]  # the flag word, and the value word when separate
    value: str | None


def items(words: list[shell.Word]) -> list[Item]:
    """The training script's arguments as flags with their values (Megatron's flag table says which take one)."""
    out: list[Item] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.value.partition("=")
        if not name.startswith("-"):
            i += 1
            continue
        flag = F.BY_SPELLING.get(name)
        nxt_is_value = i + 1 < len(words) and not words[i + 1].value.startswith("-")
        takes_value = flag.kind is F.Kind.VALUE if flag else nxt_is_value
        if eq or not takes_value:
            out.append(Item(name, [word], value if eq else None))
            i += 1
        else:
            nxt = words[i + 1] if i + 1 < len(words) else None
            out.append(Item(name, [word] + ([nxt] if nxt else []), nxt.value if nxt else None))
            i += 2
    return out


def check_known(launch: Launch) -> None:
    """SpecError naming the line of an argument the plan needs that uses a variable the script never sets."""
    for item in items(launch.arg_words):
        flag = F.BY_SPELLING.get(item.flag)
        if flag is None:
            continue
        for word in item.words:
            if word.unknown:
                raise SpecError(
                    f"{launch.source} line {word.line}: {item.flag} uses ${word.unknown[0]}, which the script never "
                    "sets (it comes from the environment the job runs in)",
                    f"set {word.unknown[0]} in the script before the command, or write the value",
                )


def strip_flags(argv: list[str], keep: set[str]) -> list[str]:
    """`argv` without the strategy flags the plan will choose (those of --keep stay)."""
    kept = {f.spelling for k in keep for f in KEEP[k]}
    out, i = [], 0
    while i < len(argv):
        name, eq, _ = argv[i].partition("=")
        flag = STRATEGY_SPELLINGS.get(name)
        if flag is None or name in kept:
            out.append(argv[i])
            i += 1
            continue
        i += 1 if (eq or flag.kind is not F.Kind.VALUE) else 2
    return out


def current_configuration(argv: list[str], cluster, profile) -> Configuration:
    """The launch as it is, priced: Megatron's defaults for absent flags (TP, CP, PP 1, no distributed optimizer,
    no recompute), the split even over its stages and model chunks, only the overlaps it turns on."""
    from uniap.planner import configure

    job = job_from_args(argv)
    p = job.pins
    if p.micro_batch_per_replica is None:
        raise SpecError("the launch has no --micro-batch-size (Megatron-LM requires it)", "add it to the script")
    plan, prediction = configure(
        job.model,
        cluster,
        replace(job.training, overlaps=job.overlaps),
        target=MEGATRON.name,
        tp=p.tp or 1,
        pp=p.pipeline_degree or 1,
        micro_batch_size=p.micro_batch_per_replica,
        zero=p.zero or 0,
        recompute=p.recompute or "none",
        profile=profile,
        cp=p.cp or 1,
        virtual_stages=p.virtual_stages or 1,
        offloaded_layers=p.offloaded_layers or 0,
    )
    return Configuration("current", plan, prediction.fits, max(prediction.stage_memory), prediction.memory_capacity)


@dataclass
class Edit:
    span: shell.Span
    text: str


def edits_for(launch: Launch, new_argv: list[str]) -> tuple[list[Edit], list[str], list[str]]:
    """Text edits turning the launch's arguments into `new_argv`, and the argument diff (removed, added) in words.
    A strategy flag the plan keeps keeps its words; a changed value is replaced where it is written (an
    assignment when the word is a whole `$NAME`); a dropped flag is removed; new flags go after the last word."""
    old_items = [i for i in items(launch.arg_words) if i.flag in STRATEGY_SPELLINGS]
    new = {}
    j = 0
    while j < len(new_argv):
        name, eq, value = new_argv[j].partition("=")
        flag = STRATEGY_SPELLINGS.get(name)
        if flag is not None:
            takes = flag.kind is F.Kind.VALUE and not eq
            new[name] = value if eq else (new_argv[j + 1] if takes else None)
            j += 2 if takes else 1
            continue
        j += 1
    edits: list[Edit] = []
    removed: list[str] = []
    added: list[str] = []
    seen = set()
    for item in old_items:
        seen.add(item.flag)
        if item.flag not in new:
            for word in item.words:
                edits.append(Edit(_written_span(launch, word), ""))
            removed.append(" ".join(w.value for w in item.words))
            continue
        wanted = new[item.flag]
        if wanted is None or wanted == item.value:
            continue
        value_word = item.words[-1]
        target = value_word.source or _written_span(launch, value_word)
        if len(item.words) == 1:  # --flag=value in one word
            edits.append(Edit(target, shlex.quote(f"{item.flag}={wanted}")))
        else:
            edits.append(Edit(target, shlex.quote(wanted)))
        removed.append(f"{item.flag} {item.value}")
        added.append(f"{item.flag} {wanted}")
    extra = []
    for name, value in new.items():
        if name not in seen:
            extra += [name] + ([value] if value is not None else [])
            added.append(f"{name}{'' if value is None else ' ' + value}")
    if extra:  # after the command's last word as written (a spliced array's elements live elsewhere)
        end = launch.command.span.end
        edits.append(Edit(shell.Span(end, end), " " + " ".join(shlex.quote(t) for t in extra)))
    return edits, removed, added


def environment_edits(launch: Launch, env: dict[str, str]) -> list[Edit]:
    """`export NAME=value` lines, before the training command, for what the plan needs from the environment
    (CUDA_DEVICE_MAX_CONNECTIONS) where the script does not already export that value."""
    script = launch.script
    missing = {
        name: value
        for name, value in env.items()
        if name not in script.exported or [w.value for w in script.variables.get(name, [])] != [value]
    }
    if not missing:
        return []
    start = script.text.rfind("\n", 0, launch.command.span.start) + 1
    lines = [f"export {name}={shlex.quote(value)}  # uniap: the plan needs it\n" for name, value in missing.items()]
    return [Edit(shell.Span(start, start), "".join(lines))]


def _written_span(launch: Launch, word: shell.Word) -> shell.Span:
    """Where `word` is written in the script (its own text, not an assignment it expanded)."""
    if word.written is None:
        raise SpecError(
            f"{launch.source} line {word.line}: {word.value!r} is built from several pieces of text, so uniap "
            "cannot change it in place",
            "write that argument as a plain word, or convert the arguments after --",
        )
    return word.written


def apply_edits(text: str, edits: list[Edit]) -> str:
    """`text` with `edits` applied; a line left empty by removals (blank or a lone continuation) goes too."""
    out = text
    for edit in sorted(edits, key=lambda e: e.span.start, reverse=True):
        start, end = edit.span.start, edit.span.end
        if not edit.text and start != end:
            while start > 0 and out[start - 1] in " \t":
                start -= 1
        out = out[:start] + edit.text + out[end:]
    lines = out.split("\n")
    original = set(text.split("\n"))
    kept = [line for line in lines if line in original or line.strip() not in ("", "\\")]
    return "\n".join(kept)


def convert(args) -> int:
    from uniap.cluster.spec import load_cluster
    from uniap.profile.schema import Profile

    from .planning import plan_megatron

    if args.script and args.args:
        raise SpecError("give either a launch script or the arguments after --, not both")
    if args.script:
        path = Path(args.script)
        text = read_text(path, "launch script")
        launch = read_launch(text, str(path))
    elif args.args:
        text = shlex.join(args.args)
        launch = read_launch(text, "the command line")
        path = None
    else:
        raise SpecError("nothing to convert", "pass a launch script, or `-- pretrain_gpt.py <Megatron arguments>`")
    check_known(launch)
    keep = keep_choices(args.keep, tuple(KEEP))
    nodes = args.nodes or launch.nodes or 1
    gpus = args.gpus_per_node or launch.gpus_per_node
    if gpus is None:
        raise SpecError(
            f"{launch.source}: the launch does not say how many GPUs each node runs",
            "pass --gpus-per-node",
        )
    cluster = load_cluster(args.cluster, nodes, gpus)
    profile = Profile.load(args.profile) if args.profile else None
    argv = launch.argv
    before = current_configuration(argv, cluster, profile)
    planning_argv = strip_flags(argv, keep)
    progress = False if args.json else None  # a bar on a terminal while the search runs
    plan = plan_megatron(planning_argv, nodes, gpus, args.cluster, args.profile, args.time_limit, progress)
    new_argv, _merge = merged_argv(plan, planning_argv)
    after = Configuration.planned(plan)
    edits, removed, added = edits_for(launch, new_argv)
    edits += environment_edits(launch, _merge.env)
    out_path = None
    if path is not None:
        out_path = output_path(path, args.output, args.force, "script", [args.cluster, args.profile])
        executable = path.stat().st_mode & 0o111 != 0
        write_text_atomic(out_path, apply_edits(text, edits), executable=executable, newline=line_ending(path))
    if args.json:
        print(
            json.dumps(
                conversion_report(
                    before,
                    after,
                    removed=removed,
                    added=added,
                    arguments=new_argv,
                    converted=str(out_path) if out_path else None,
                ),
                indent=2,
            )
        )
        return EXIT_OK
    print(f"{PROG}: {launch.source}, {nodes} x {gpus} GPUs of {cluster.name} ({cluster.gpu_name})")
    print(before_after(before, after, removed, added))
    if out_path:
        print(f"\n  converted script written to {out_path} (the original is unchanged)")
    else:
        launcher = [w.value for w in launch.command.words[: launch.script_index + 1]]
        print("\n  converted arguments: " + shlex.join(launcher + new_argv))
    return EXIT_OK


DESCRIPTION = """\
Price an existing Megatron-LM launch as it is, plan it, and write it converted.
  uniap convert megatron train_gpt3.sh --cluster dgx-h100 [--keep tp,pp]
  uniap convert megatron --gpus-per-node 8 -- pretrain_gpt.py --num-layers 32 ...
The script is read, never run: continuation lines, variables, bash arrays and
exported variables as Megatron-LM's example scripts use them. The converted
script (NAME.uniap.sh beside the original, or -o) changes only the parallel
flags, where they are written; the original is never modified."""


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(PROG, DESCRIPTION)
    p.add_argument("script", nargs="?", help="the launch script (bash) that starts training")
    p.add_argument("--nodes", type=int, help="nodes (default: the launcher's --nnodes, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the launcher's --nproc-per-node)")
    add_options(p, tuple(KEEP), "script")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = argv[argv.index("--") + 1 :] if "--" in argv else []
    head = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(head)
    args.args = tail
    return guarded(PROG, lambda: convert(args))
