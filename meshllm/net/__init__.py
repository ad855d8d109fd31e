"""The asyncio network layer: authenticated TCP links over the pure wire core."""
