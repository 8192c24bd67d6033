"""User-facing errors: each carries an exit code and a message that names the cause and a remedy.

The CLI prints the message (no traceback) and exits with the code. Codes are documented in README.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_TIME_LIMIT = 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (128 + 2)

EXIT_CODE_MEANINGS = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it)",
    EXIT_INVALID_INPUT: "invalid input (a spec, preset, file, profile or option)",
    EXIT_INFEASIBLE: "no plan fits in memory (the message gives the least memory one needs)",
    EXIT_TIME_LIMIT: "the time limit passed before any plan was found",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
ALL_EXIT_CODES = tuple(EXIT_CODE_MEANINGS)


def exit_codes_epilog(codes: Iterable[int] = ALL_EXIT_CODES, note: str = "") -> str:
    """The `exit codes:` block of a command's --help, one code a line (for argparse's
    RawDescriptionHelpFormatter, which keeps the lines); `note` follows it, e.g. a code passed through."""
    lines = ["exit codes:", *(f"  {code:>3}  {EXIT_CODE_MEANINGS[code]}" for code in codes)]
    return "\n".join([*lines, note] if note else lines)


class UniapError(Exception):
    """Base class of errors caused by the user's input or situation, not by a bug."""

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  try: {self.hint}"


class SpecError(UniapError, ValueError):
    """A model, cluster, training or strategy spec breaks a rule; the message names field and rule."""


class UnknownPresetError(SpecError):
    """A preset name that is not known; the message lists the known ones."""

    @classmethod
    def of(cls, what: str, name: str, known: Iterable[str], hint: str) -> UnknownPresetError:
        """ "unknown model preset 'lama2-7b' (did you mean llama2-7b?)", with the known presets."""
        known = list(known)
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
        guess = f" (did you mean {' or '.join(close)}?)" if close else ""
        return cls(f"unknown {what} '{name}'{guess}; known: {', '.join(known)}", hint)


class ProfileError(UniapError):
    """A profile file is missing, corrupt, of an unknown version, or does not fit the model."""


class InfeasibleError(UniapError):
    """No candidate plan fits in memory; carries the least memory any candidate needed."""

    exit_code = EXIT_INFEASIBLE


class SolverTimeLimitError(UniapError):
    """The solver stopped at its time limit before finding any feasible plan."""

    exit_code = EXIT_TIME_LIMIT
