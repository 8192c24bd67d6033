"""The `uniap-megatron` console command (see uniap.entry: interrupts during imports included)."""

from uniap.entry import run_command


def main() -> int:
    return run_command("uniap-megatron", "uniap_megatron.cli")
