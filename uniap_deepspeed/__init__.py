"""DeepSpeed adapter: capability, plan -> DeepSpeed config, explicit pipeline partitions."""
