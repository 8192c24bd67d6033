"""A launch script read as bash would read it, without running it: the words of each command after variable and
array expansion, each word traced back to the text it came from, so a converter can edit values in place and
keep everything else of the user's script byte for byte.

The subset is what training launch scripts use (Megatron-LM's examples, Slurm batch files): comments, line
continuations, single and double quotes, backslash escapes, `NAME=value` and `export NAME=value`, arrays
`NAME=(words ...)` over several lines, `$NAME`, `${NAME}`, `${NAME:-default}`, `"${NAME[@]}"`. Anything else a
word needs (command substitution, arithmetic, `${NAME[i]}`) leaves a variable unknown: `Word.unknown` names it,
and a converter that needs the value says which line and what to pass instead. Control flow (`if`, `for`,
functions) is read as plain commands: every assignment counts, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SpecError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
_OPERATORS = (";", "&&", "||", "|", "&")


@dataclass(frozen=True)
class Span:
    """A range of the script's text: [start, end) character offsets."""

    start: int
    end: int


@dataclass(frozen=True)
class Word:
    """One word after expansion. `source`: the span of the script's text this word's value can be edited at
    (the literal word itself, or the value of the assignment a whole-word `$NAME` expanded); None when the
    value was built from several pieces. `written`: where the word itself is written (removing it removes the
    argument; for an array's element, in the array). `unknown`: variables it used that the script never set."""

    value: str
    source: Span | None
    line: int
    unknown: tuple[str, ...] = ()
    written: Span | None = None


@dataclass
class Command:
    """A simple command: its words after expansion, its 1-based first line and the span of its text."""

    words: list[Word]
    line: int
    span: Span


@dataclass
class Script:
    """What the script sets and runs, in order."""

    text: str
    variables: dict[str, list[Word]] = field(default_factory=dict)
    exported: set[str] = field(default_factory=set)
    commands: list[Command] = field(default_factory=list)

    def line_of(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1


@dataclass
class _Raw:
    """A word as written: its text without the quoting, the pieces to expand, where it is."""

    parts: list[tuple[str, str]]  # (kind, text): 'lit' literal text, 'var' a $NAME / ${...} to expand (quoted?)
    span: Span


def parse(text: str) -> Script:
    """Read `text` as a bash script; SpecError naming the line for what bash itself would refuse (an unclosed
    quote or array)."""
    script = Script(text)
    tokens = _tokenize(text)
    i = 0
    command: list[_Raw | str] = []
    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, str) and tok in ("\n", *_OPERATORS):
            _finish(script, command)
            command = []
            i += 1
            continue
        if isinstance(tok, str) and tok == "(":  # an array value right after NAME=
            prev = command[-1] if command else None
            if isinstance(prev, _Raw) and _assignment_name(prev) and _raw_text(prev).endswith("="):
                end = _matching(tokens, i, script.line_of(prev.span.start))
                elements = [t for t in tokens[i + 1 : end] if isinstance(t, _Raw)]
                command[-1] = _ArrayAssign(prev, elements)
                i = end + 1
                continue
        if isinstance(tok, str) and tok == ")":
            i += 1
            continue
        command.append(tok)
        i += 1
    _finish(script, command)
    return script


@dataclass
class _ArrayAssign:
    name_word: _Raw
    elements: list[_Raw]


def _assignment_name(raw: _Raw) -> str | None:
    if not raw.parts or raw.parts[0][0] != "lit":
        return None
    m = _ASSIGNMENT.match(raw.parts[0][1])
    return m.group(1) if m else None


def _raw_text(raw: _Raw) -> str:
    return "".join(text for kind, text in raw.parts if kind == "lit")


def _finish(script: Script, command: list) -> None:
    """Apply the assignments of one simple command, or record it as a command."""
    if not command:
        return
    words = list(command)
    export = False
    if isinstance(words[0], _Raw) and words[0].parts == [("lit", "export")]:
        export, words = True, words[1:]
    while words:
        first = words[0]
        if isinstance(first, _ArrayAssign):
            name = _assignment_name(first.name_word)
            append = _raw_text(first.name_word).endswith("+=")
            values = [w for raw in first.elements for w in _expand(script, raw)]
            script.variables[name] = (script.variables.get(name, []) if append else []) + values
            if export:
                script.exported.add(name)
            words = words[1:]
            continue
        if isinstance(first, _Raw) and (name := _assignment_name(first)):
            lit = first.parts[0][1]
            prefix = lit[: lit.index("=") + 1]
            value_raw = _Raw(
                [("lit", lit[len(prefix) :]), *first.parts[1:]],
                Span(first.span.start + len(prefix), first.span.end),  # the name and `=` are never quoted
            )
            expanded = _expand(script, value_raw, split=False)
            joined = " ".join(w.value for w in expanded)
            single = expanded[0] if len(expanded) == 1 else None
            source = single.source if single else None
            unknown = tuple(u for w in expanded for u in w.unknown)
            line = script.line_of(first.span.start)
            script.variables[name] = [Word(joined, source, line, unknown)]
            if export:
                script.exported.add(name)
            words = words[1:]
            continue
        break
    if export and words:  # `export NAME` without a value
        for raw in words:
            if isinstance(raw, _Raw):
                script.exported.add(_raw_text(raw))
        return
    if not words:
        return
    raws = [w for w in words if isinstance(w, _Raw)]
    expanded = [w for raw in raws for w in _expand(script, raw)]
    if expanded:
        start, end = raws[0].span.start, raws[-1].span.end
        script.commands.append(Command(expanded, script.line_of(start), Span(start, end)))


def _expand(script: Script, raw: _Raw, split: bool = True) -> list[Word]:
    """The words `raw` expands to: an array splices its elements, an unquoted variable splits on whitespace."""
    line = script.line_of(raw.span.start)
    if len(raw.parts) == 1 and raw.parts[0][0] in ("var", "qvar"):
        kind, ref = raw.parts[0]
        name, array, default = _reference(ref)
        values = script.variables.get(name)
        if values is None:
            if default is not None:
                return [Word(default, None, line, (), raw.span)]
            return [Word("", None, line, (name,), raw.span)]
        if array:
            return list(values)
        value = values[0] if values else Word("", None, line)
        if kind == "var" and split and len(value.value.split()) > 1:
            return [Word(v, None, line, value.unknown) for v in value.value.split()]
        return [Word(value.value, value.source, line, value.unknown, raw.span)]
    out, unknown = [], []
    for kind, text in raw.parts:
        if kind == "lit":
            out.append(text)
            continue
        name, _array, default = _reference(text)
        values = script.variables.get(name)
        if values is None:
            if default is not None:
                out.append(default)
            else:
                unknown.append(name)
            continue
        out.append(" ".join(w.value for w in values))
        unknown.extend(u for w in values for u in w.unknown)
    literal = all(kind == "lit" for kind, _ in raw.parts)
    return [Word("".join(out), raw.span if literal else None, line, tuple(unknown), raw.span)]


def _reference(text: str) -> tuple[str, bool, str | None]:
    """(name, whole array, default) of `$NAME`, `${NAME}`, `${NAME[@]}`, `${NAME:-default}`; a name that
    is not one of these (command substitution, arithmetic) comes back as itself, never set."""
    if text.startswith("${") and text.endswith("}"):
        inner = text[2:-1]
        if inner.endswith("[@]") or inner.endswith("[*]"):
            return inner[:-3], True, None
        for op in (":-", "-"):
            if op in inner and _NAME.fullmatch(inner.split(op, 1)[0]):
                name, default = inner.split(op, 1)
                return name, False, default
        return inner, False, None
    return text[1:], False, None


def _matching(tokens: list, start: int, line: int) -> int:
    depth = 0
    for j in range(start, len(tokens)):
        if tokens[j] == "(":
            depth += 1
        elif tokens[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    raise SpecError(f"line {line}: an array `(` is never closed", "close it with `)`")


def _tokenize(text: str) -> list:
    """Words (as _Raw, with their spans) and the operators and newlines between them."""
    out: list = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and text.startswith("\\\n", i):  # a line continuation
            i += 2
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == "\n":
            out.append("\n")
            i += 1
            continue
        if c in "()":
            out.append(c)
            i += 1
            continue
        op = next((o for o in ("&&", "||", ";", "|", "&") if text.startswith(o, i)), None)
        if op:
            out.append(op)
            i += len(op)
            continue
        if c in "<>":  # a redirection and its target are not arguments
            i += 1
            while i < n and text[i] in "<>&":
                i += 1
            while i < n and text[i] in " \t":
                i += 1
            _, i = _word(text, i)
            continue
        raw, i = _word(text, i)
        if re.fullmatch(r"[0-9]+", _raw_text(raw)) and i < n and text[i] in "<>":
            continue  # `2>&1`: the descriptor of a redirection
        out.append(raw)
    return out


def _word(text: str, i: int) -> tuple[_Raw, int]:
    """One word from offset `i`: its parts and where it ends."""
    start, n = i, len(text)
    parts: list[tuple[str, str]] = []
    lit: list[str] = []

    def flush():
        if lit:
            parts.append(("lit", "".join(lit)))
            lit.clear()

    while i < n:
        c = text[i]
        if c in " \t\r\n;&|()<>":
            break
        if c == "\\":
            if text.startswith("\\\n", i):
                i += 2
                continue
            lit.append(text[i + 1] if i + 1 < n else "")
            i += 2
            continue
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise SpecError(f"line {text.count(chr(10), 0, i) + 1}: a single quote is never closed")
            lit.append(text[i + 1 : end])
            i = end + 1
            continue
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        lit.append(text[i + 1])
                    i += 2
                    continue
                if text[i] == "$":
                    ref, i = _dollar(text, i)
                    if ref:
                        flush()
                        parts.append(("qvar", ref))
                        continue
                    lit.append("$")
                    continue
                lit.append(text[i])
                i += 1
            if i >= n:
                raise SpecError(f"line {text.count(chr(10), 0, start) + 1}: a double quote is never closed")
            i += 1
            continue
        if c == "$":
            ref, i = _dollar(text, i)
            if ref:
                flush()
                parts.append(("var", ref))
                continue
            lit.append("$")
            continue
        lit.append(c)
        i += 1
    flush()
    return _Raw(parts or [("lit", "")], Span(start, i)), i


def _dollar(text: str, i: int) -> tuple[str | None, int]:
    """A `$` reference at offset `i` and the offset after it; (None, i + 1) for a lone `$`."""
    for opening, closing in (("{", "}"), ("(", ")")):  # ${...} and $(...), nested ones inside
        if text.startswith("$" + opening, i):
            end = _closing(text, i + 1, opening, closing)
            return text[i : end + 1], end + 1
    m = _NAME.match(text, i + 1)
    if m:
        return text[i : m.end()], m.end()
    if i + 1 < len(text) and (text[i + 1].isdigit() or text[i + 1] in "@*#?$!"):
        return text[i : i + 2], i + 2
    return None, i + 1


def _closing(text: str, start: int, opening: str, closing: str) -> int:
    """The offset of the bracket that closes the one at `start`; SpecError naming the line when none does."""
    depth = 0
    for j in range(start, len(text)):
        if text[j] == opening:
            depth += 1
        elif text[j] == closing:
            depth -= 1
            if depth == 0:
                return j
    raise SpecError(f"line {text.count(chr(10), 0, start) + 1}: `${opening}` is never closed")
