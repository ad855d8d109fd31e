"""Collectives: the star allreduce's round logic (pure) and its asyncio driver."""
