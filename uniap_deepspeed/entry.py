"""The `uniap-deepspeed` console command (see uniap.entry: interrupts during imports included)."""

from uniap.entry import run_command


def main() -> int:
    return run_command("uniap-deepspeed", "uniap_deepspeed.cli")
