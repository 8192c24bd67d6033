"""File I/O shared by every loader: text that fails cleanly, YAML/JSON mappings, atomic writes with the
mode the user's umask gives."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import yaml

from .errors import SpecError

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


# The largest spec, profile, plan, log or launch script uniap reads (a training log of millions of lines fits).
MAX_INPUT_BYTES = 256 * 2**20


def read_text(path: Path, what: str, error=SpecError) -> str:
    """A regular file's text, at most MAX_INPUT_BYTES; a device, pipe or folder, a larger file, an unreadable or
    non-UTF-8 one raises `error` naming the file (a named pipe is never opened: reading it could wait forever)."""
    try:
        info = Path(path).stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} file {path} is not a regular file", f"pass the path of a {what} file")
        if info.st_size > MAX_INPUT_BYTES:
            raise error(f"{what} file {path} is {info.st_size:,} bytes; uniap reads at most {MAX_INPUT_BYTES:,}")
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{what} file {path} is not a text file (not UTF-8)") from None


def line_ending(path: Path) -> str:
    """The line ending a text file uses ("\r\n" where its first line ends so, else "\n"): `read_text` gives
    every file "\n", and a file written back from it keeps its author's ending (`write_text_atomic`)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(MAX_INPUT_BYTES)
    except OSError:
        return "\n"
    first = head.find(b"\n")
    return "\r\n" if first > 0 and head[first - 1 : first] == b"\r" else "\n"


def is_file_ref(ref: str) -> bool:
    """Whether `ref` names an existing file or folder (a name too long for a path is not one)."""
    try:
        return Path(ref).exists()
    except (OSError, ValueError):
        return False


def looks_like_path(ref: str) -> bool:
    """Whether `ref` is meant as a file (a folder part or a spec file's suffix), not a preset name."""
    return any(sep in ref for sep in ("/", os.sep)) or ref.endswith(SPEC_SUFFIXES)


def check_file_ref(ref: str, what: str) -> None:
    """A reference meant as a file that is not there: SpecError saying so (not 'unknown preset')."""
    if looks_like_path(ref) and not is_file_ref(ref):
        raise SpecError(f"{what} file {ref} does not exist", f"check the path, or pass a {what} preset name")


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
    except RecursionError:
        raise SpecError(f"{what} file {path} nests its values too deeply to be a {what}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} file {path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def new_file_mode(executable: bool = False) -> int:
    """The mode the user's own tools give a new file: 0666 (0777 for a script) less the umask.

    The umask can only be read by setting it; it is set back at once (the process is not threaded here)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


def _create_exclusively(tmp: str, path: Path) -> None:
    """Move `tmp` to `path` only if nothing is there (FileExistsError otherwise); on a file system without hard
    links, an atomic replace after a last look."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_text_atomic(path: Path, text: str, *, executable: bool = False, newline: str = "\n") -> None:
    """Write `text` to a temporary file beside `path`, then rename: a crash never leaves half a file.

    The file gets `new_file_mode(executable)`, as a fresh file from a shell redirect would (mkstemp's 0600 is
    replaced), also when it replaces an existing file; its lines end with `newline` (`line_ending`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise SpecError(f"cannot write {path}: {exc.strerror}", "choose another output path") from None
    try:
        os.fchmod(fd, new_file_mode(executable))
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
        if os.path.abspath(path) in _CLAIMED_NEW:  # new without --force: created only if still absent
            _CLAIMED_NEW.discard(os.path.abspath(path))
            _create_exclusively(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise SpecError(
            f"{path} appeared while uniap was working (another run wrote it); not overwriting it",
            "pass --force, or choose another output path",
        ) from None
    except OSError as exc:  # a full disk, a quota: the user's file, if any, is left as it was
        Path(tmp).unlink(missing_ok=True)
        raise SpecError(f"cannot write {path}: {exc.strerror}", "free space, or choose another output path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON through `write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# Paths check_output_path found free without --force: the writer creates them exclusively, so that two runs
# writing the same new file cannot both report success (the second is refused, its plan not lost silently).
_CLAIMED_NEW: set[str] = set()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_output_path(
    path: str | Path, force: bool, option: str = "-o", inputs: Iterable[str | Path | None] = ()
) -> None:
    """Before any work is done: SpecError (exit 2) naming `path` and the reason it cannot be written -- an
    empty name, a folder (or a name ending in a separator), a link, a device or anything but a regular file,
    an existing file without `force`, one of the command's `inputs`, a location the user may not create files
    in. uniap writes only regular files and new paths."""
    if not str(path):
        raise SpecError(f"{option} needs a file name (got an empty one)", f"pass {option} plan.json")
    if str(path).endswith((os.sep, "/")):
        raise SpecError(f"{option} {path} names a folder, not a file", "give a file path inside it, e.g. plan.json")
    path = Path(path)
    _CLAIMED_NEW.discard(os.path.abspath(path))
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # a missing file, or one under a file (said below)
        info = None
    except OSError as exc:  # a name too long for the file system
        raise SpecError(f"cannot write {option} {path}: {exc.strerror}", f"choose another {option} path") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise SpecError(f"{option} {path} is a folder, not a file", "give a file path inside it, e.g. plan.json")
        if stat.S_ISLNK(info.st_mode):
            raise SpecError(f"{option} {path} is a symbolic link; uniap does not replace links", "write to its target")
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"{option} {path} is not a regular file (a device or a pipe)", f"choose another {option}")
        for source in inputs:
            if source is not None and _same_file(path, Path(source)):
                raise SpecError(
                    f"{option} {path} is also what the command reads; uniap never writes over its inputs",
                    f"choose another {option} path",
                )
        if not force:
            raise SpecError(f"{path} exists; not overwriting it", f"pass --force, or choose another {option} path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the writer creates the missing folders below the nearest existing one
    if not folder.is_dir():
        raise SpecError(f"cannot write {path}: {folder} is not a folder", f"choose another {option} path")
    try:  # the only check that is true for read-only file systems, /proc and permissions alike
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise SpecError(f"cannot write {path}: {exc.strerror} (in {folder})", f"choose another {option} path") from None
    os.close(fd)
    os.unlink(probe)
    if info is None and not force:
        _CLAIMED_NEW.add(os.path.abspath(path))


def check_output_paths(paths: list[str | Path | None], force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """check_output_path for each file a command is about to write (None: not written); two of them may not
    be the same file."""
    written = [Path(p) for p in paths if p is not None]
    seen: dict[str, Path] = {}
    for path in written:
        key = os.path.abspath(path)
        if key in seen:
            raise SpecError(
                f"{seen[key]} and {path} are the same file; the command writes both", "give each its own path"
            )
        seen[key] = path
        check_output_path(path, force, option="output", inputs=inputs)
