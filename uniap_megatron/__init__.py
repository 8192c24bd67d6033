"""Megatron-LM adapter: capability, plan -> arguments, the --auto-parallel plugin."""
