"""The console commands' entry: Ctrl-C at any moment, also while the solver or a framework is still being
imported, ends with "<prog>: interrupted" on stderr and exit code 130, never a traceback. Each command's
`main` handles it once running; this covers the import before it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from importlib import import_module

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, UniapError


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


def add_profile_command(sub, what: str) -> None:
    """An adapter's `profile` subcommand (its options are the profiler's own: adapter_main passes them on)."""
    sub.add_parser("profile", help=f"measure {what}; write a profile JSON", add_help=False)


def adapter_main(
    prog: str,
    argv: list[str],
    parser,
    commands: dict[str, Callable],
    profiler: str,
    no_script_args: tuple[str, ...] = (),
) -> int:
    """An adapter's command line (uniap-megatron, uniap-deepspeed): `profile ...` goes to the main_profile of
    the adapter's `profiler` module, which parses its own options (imported only then); otherwise the words
    after `--` are the training script's (args.script_args; refused for the commands in `no_script_args`) and
    the subcommand runs guarded."""
    if argv[:1] == ["profile"]:
        return import_module(profiler).main_profile(argv[1:])
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.script_args = argv[cut + 1 :]
    if args.command in no_script_args and args.script_args:
        print(f"{prog}: error: `{args.command}` takes no arguments after --", file=sys.stderr)
        return EXIT_INVALID_INPUT
    return guarded(prog, lambda: commands[args.command](args))
