"""User-facing errors: each carries an exit code and a message that names the cause and a remedy.

The CLI prints the message (no traceback) and exits with the code. Codes are documented in README.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID_INPUT = 2
EXIT_INFEASIBLE = 3
EXIT_TIME_LIMIT = 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT (128 + 2)


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


class ProfileError(UniapError):
    """A profile file is missing, corrupt, of an unknown version, or does not fit the model."""


class InfeasibleError(UniapError):
    """No candidate plan fits in memory; carries the least memory any candidate needed."""

    exit_code = EXIT_INFEASIBLE


class SolverTimeLimitError(UniapError):
    """The solver stopped at its time limit before finding any feasible plan."""

    exit_code = EXIT_TIME_LIMIT
