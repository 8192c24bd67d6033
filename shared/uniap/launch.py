"""A launch script's training command, and the cluster shape its launcher or Slurm directives name.

The script is read with uniap.shell (never run). The training command is the first that runs a `.py` file; the
words before it are the launcher's (torchrun, `python -m torch.distributed.run`, the deepspeed launcher, srun),
whose flags give nodes and processes per node, else the `#SBATCH` directives of a Slurm batch file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import shell
from .errors import SpecError

# Launchers and how they name the cluster's shape: (nodes flags, processes-per-node flags).
LAUNCHERS = {
    "torchrun": (("--nnodes",), ("--nproc_per_node", "--nproc-per-node")),
    "torch.distributed.run": (("--nnodes",), ("--nproc_per_node", "--nproc-per-node")),
    "torch.distributed.launch": (("--nnodes",), ("--nproc_per_node", "--nproc-per-node")),
    "deepspeed": (("--num_nodes",), ("--num_gpus",)),
    "srun": (("--nodes", "-N"), ("--ntasks-per-node", "--gpus-per-node")),
}


@dataclass
class Launch:
    """The training command of a launch script."""

    script: shell.Script  # what the whole script sets and runs (its text among it)
    command: shell.Command
    script_index: int  # the word that is the training script
    nodes: int | None
    gpus_per_node: int | None
    source: str  # the file, or "the command line"

    @property
    def argv(self) -> list[str]:
        return [w.value for w in self.command.words[self.script_index + 1 :]]

    @property
    def arg_words(self) -> list[shell.Word]:
        return self.command.words[self.script_index + 1 :]


def read_launch(text: str, source: str) -> Launch:
    """The training command of `text`; SpecError naming the line when there is none or it cannot be read."""
    script = shell.parse(text)
    for command in script.commands:
        values = [w.value for w in command.words]
        index = next((i for i, v in enumerate(values) if v.endswith(".py")), None)
        if index is None:
            continue
        nodes, gpus = _shape(values[:index], command)
        directives = _sbatch(text)
        return Launch(
            script,
            command,
            index,
            nodes or directives.get("nodes"),
            gpus or directives.get("gpus_per_node"),
            source,
        )
    raise SpecError(
        f"{source}: no command runs a .py training script (torchrun / python -m torch.distributed.run / "
        "deepspeed / srun / python ... train.py)",
        "pass the launch script that starts training, or the training arguments after --",
    )


SBATCH = {"--nodes": "nodes", "-N": "nodes", "--ntasks-per-node": "gpus_per_node", "--gpus-per-node": "gpus_per_node"}


def _sbatch(text: str) -> dict[str, int]:
    """Nodes and GPUs per node from a Slurm batch file's `#SBATCH` directives (one task per GPU)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        words = line.split()[1:]
        for i, word in enumerate(words):
            name, eq, value = word.partition("=")
            value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
            value = value.split(":")[-1]  # --gpus-per-node=h100:8
            if name in SBATCH and value.isdigit():
                found.setdefault(SBATCH[name], int(value))
    return found


def _shape(launcher: list[str], command: shell.Command) -> tuple[int | None, int | None]:
    """(nodes, processes per node) from the launcher's arguments, None where it does not say."""
    kind = next((k for k in LAUNCHERS if any(Path(w).name == k or w == k for w in launcher)), None)
    if kind is None:
        return None, None
    node_flags, gpu_flags = LAUNCHERS[kind]
    found: dict[str, str] = {}
    for i, word in enumerate(launcher):
        name, eq, value = word.partition("=")
        if name in node_flags + gpu_flags:
            found[name] = value if eq else (launcher[i + 1] if i + 1 < len(launcher) else "")
    return _count(found, node_flags, command), _count(found, gpu_flags, command)


def _count(found: dict[str, str], names: tuple[str, ...], command: shell.Command) -> int | None:
    for name in names:
        if name in found:
            text = found[name].split(":")[-1]  # torchrun's MIN:MAX
            if not text.isdigit() or int(text) < 1:
                raise SpecError(
                    f"line {command.line}: the launcher's {name} is {found[name]!r}, not a number this script sets",
                    "pass --nodes and --gpus-per-node to uniap convert",
                )
            return int(text)
    return None
