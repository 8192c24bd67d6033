"""The environment of a child process a test starts: this one's without any launcher's rank variables, so the
child sets up its own process group (or none)."""

from __future__ import annotations

import os

# Set by torchrun and the deepspeed launcher; a child inheriting them would join the wrong group.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, warnings off, one thread per process (tiny CPU
    kernels time steadily and concurrent ranks do not oversubscribe the cores), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.update(extra)
    return env
