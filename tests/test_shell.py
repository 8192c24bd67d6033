"""uniap.shell reads launch scripts as bash does, without running them, and traces every word to its text."""

from __future__ import annotations

import pytest

from uniap.errors import SpecError
from uniap.shell import parse

SCRIPT = """#!/bin/bash
# a comment with 'quotes' and $VARS
export CUDA_DEVICE_MAX_CONNECTIONS=1
GPUS=8
NAME="my run"   # trailing comment
ADDR=${MASTER_ADDR:-localhost}
ARGS=(
    --num-layers 4   # inside an array
    --name "$NAME"
)
ARGS+=(--lr 3e-4)
torchrun --nproc_per_node $GPUS train.py \\
    "${ARGS[@]}" --tp $GPUS --path=/data/$NAME 'it'"'"'s' 2>&1 | tee "log $NAME.txt"
echo done; python -c "print(1)" > /dev/null
"""


def test_variables_arrays_continuations_and_quotes():
    script = parse(SCRIPT)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in script.exported
    assert [w.value for w in script.variables["ARGS"]] == ["--num-layers", "4", "--name", "my run", "--lr", "3e-4"]
    assert script.variables["ADDR"][0].value == "localhost"
    torchrun, tee, echo, python = script.commands
    assert [w.value for w in torchrun.words] == [
        "torchrun", "--nproc_per_node", "8", "train.py", "--num-layers", "4", "--name", "my run", "--lr", "3e-4",
        "--tp", "8", "--path=/data/my run", "it's",
    ]  # fmt: skip
    assert torchrun.line == 12
    assert [w.value for w in tee.words] == ["tee", "log my run.txt"]
    assert [w.value for w in echo.words] == ["echo", "done"]
    assert [w.value for w in python.words] == ["python", "-c", "print(1)"]  # the redirection is not an argument


def test_every_word_knows_where_to_edit_it():
    script = parse(SCRIPT)
    words = script.commands[0].words
    tp_value = words[words.index(next(w for w in words if w.value == "--tp")) + 1]
    # `$GPUS` is edited at the assignment and removed where it is written
    assert SCRIPT[tp_value.source.start : tp_value.source.end] == "8" and tp_value.line == 13
    assert SCRIPT[tp_value.written.start : tp_value.written.end] == "$GPUS"
    layers = next(w for w in words if w.value == "4")  # an array element: both in the array
    assert SCRIPT[layers.written.start : layers.written.end] == "4" and layers.line == 8
    path = next(w for w in words if w.value.startswith("--path"))
    assert path.source is None and SCRIPT[path.written.start : path.written.end] == "--path=/data/$NAME"


def test_a_variable_the_script_never_sets_is_named():
    script = parse("python train.py --num-layers $LAYERS --x ${Y}z\n")
    words = script.commands[0].words
    assert words[3].unknown == ("LAYERS",) and words[3].value == ""
    assert words[5].unknown == ("Y",) and words[5].value == "z"


@pytest.mark.parametrize(
    "text, words",
    [
        ("A=1\nB='unclosed\n", "line 2: a single quote is never closed"),
        ('A=1\n\nB="unclosed\n', "line 3: a double quote is never closed"),
        ("ARGS=(\n --a 1\n", "line 1: an array `(` is never closed"),
        ("echo ${A\n", "line 1: `${` is never closed"),
    ],
)
def test_what_bash_would_refuse_names_the_line(text, words):
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace("$", r"\$").replace("{", r"\{")):
        parse(text)
