"""The sliding-window scheduler (pure) and the per-device slice cache."""
