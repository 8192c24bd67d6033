"""The console commands' entry: Ctrl-C at any moment, also while the solver or a framework is still being
imported, ends with "<prog>: interrupted" on stderr and exit code 130, never a traceback. Each command's
`main` handles it once running; this covers the import before it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable
from importlib import import_module

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_OK, UniapError


REDELIVERY_S = 0.05  # how soon a Ctrl-C lost in a callback comes again


def _interrupt_again(unraisable) -> None:
    """A Ctrl-C that lands in a callback Python cannot raise from (an import lock's, a weak reference's) is
    printed as "Exception ignored" and lost, and the work goes on: found by benchmarks/fuzz_cli.py at 1.3 s into
    `uniap plan`, while its imports ran. Deliver it again, where the command can stop."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        # From another thread, once this hook has returned: raised here, it would be ignored again.
        again = threading.Timer(REDELIVERY_S, os.kill, (os.getpid(), signal.SIGINT))
        again.daemon = True
        again.start()
        return
    sys.__unraisablehook__(unraisable)


def run_command(prog: str, module: str) -> int:
    """Import `module` and return its `main()`'s exit code."""
    previous, sys.unraisablehook = sys.unraisablehook, _interrupt_again
    try:
        code = import_module(module).main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut the message
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        sys.unraisablehook = previous
    # The work is done and said: a Ctrl-C while the interpreter shuts down must not become a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def uniap() -> int:
    return run_command("uniap", "uniap.cli")


# Errors writing the output itself (stdout on a full disk, a closed or broken descriptor): the environment's
# problem, said as such, not a bug.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT)


def _safe_streams() -> None:
    """Text that the terminal's encoding cannot show (a non-ASCII model name under PYTHONIOENCODING=ascii) is
    written escaped, never an error."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def guarded(prog: str, command: Callable[[], int], verbose: bool = False) -> int:
    """`command()`'s exit code, its output flushed; an input error becomes `prog: error: <message>` and its
    code, a stdout that cannot take the output exit 2, Ctrl-C 130 and anything else an internal error (1), each
    said in one line on stderr, never as a traceback (`verbose`: a bug's traceback is shown)."""
    _safe_streams()
    if sys.stdout is None:
        print(f"{prog}: error: standard output is closed; redirect it (> file)", file=sys.stderr)
        return EXIT_INVALID_INPUT
    try:
        code = command()
        sys.stdout.flush()
        return code
    except UniapError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`uniap plan | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            return _internal(prog, exc, verbose)
        with contextlib.suppress(OSError):  # what could not be written is dropped, not retried at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: error: cannot write the output: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except Exception as exc:  # a bug, not the user's input
        return _internal(prog, exc, verbose)


def _internal(prog: str, exc: Exception, verbose: bool) -> int:
    if verbose:
        raise exc
    print(
        f"{prog}: internal error (a bug, please report it with -v output): {type(exc).__name__}: {exc}", file=sys.stderr
    )
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
