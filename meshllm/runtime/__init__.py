"""Per-device runtime: executors, shard workers, the single-device engine."""
