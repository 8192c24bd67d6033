"""The console commands' entry: Ctrl-C at any moment, also while the solver or a framework is still being
imported, ends with "<prog>: interrupted" on stderr and exit code 130, never a traceback. Each command's
`main` handles it once running; this covers the import before it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from importlib import import_module

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, UniapError


def run_command(prog: str, module: str) -> int:
    """Import `module` and return its `main()`'s exit code."""
    try:
        code = import_module(module).main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut the message
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # The work is done and said: a Ctrl-C while the interpreter shuts down must not become a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def uniap() -> int:
    return run_command("uniap", "uniap.cli")


def guarded(prog: str, command: Callable[[], int]) -> int:
    """`command()`'s exit code; an input error becomes `prog: error: <message>` and its code, Ctrl-C 130 and
    anything else an internal error (1), each said in one line on stderr, never as a traceback."""
    try:
        return command()
    except UniapError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not the user's input
        print(f"{prog}: internal error (a bug, please report it): {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
