"""Model math, configuration, checkpoint readers and the shard loader."""
