"""The HTTP API server (`meshllm serve`)."""
