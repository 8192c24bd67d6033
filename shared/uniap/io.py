"""File I/O shared by every loader: text that fails cleanly, YAML/JSON mappings, atomic JSON writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError


def read_text(path: Path, what: str, error=SpecError) -> str:
    """A file's text; an unreadable or non-UTF-8 file raises `error` naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{what} file {path} is not a text file (not UTF-8)") from None


def is_file_ref(ref: str) -> bool:
    """Whether `ref` names an existing file or folder (a name too long for a path is not one)."""
    try:
        return Path(ref).exists()
    except (OSError, ValueError):
        return False


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """Read a YAML or JSON file holding one mapping; errors name the file and the problem."""
    text = read_text(path, what)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            f"{what} file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} file {path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
