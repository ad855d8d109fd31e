"""BlockStore: a shard's weight blocks in memory, driven by the Window scheduler over the slice cache.

When everything fits the budget (or there is none) every block is read once at start and kept. Otherwise the
window's pinned blocks are read once and kept, and the others are read in the I/O executor ahead of use, in compute
order, as the budget allows, and dropped as soon as their compute finishes; the compute executor and the allreduce
on the wire run meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from ..model.config import ModelConfig
from ..model.loader import BlockTensors, attn_block, mlp_block
from ..model.shard import Shard
from ..scheduler.slices import SliceCache, drop_cached_pages, read_block
from ..scheduler.window import Window


def build_block(index: int, b: BlockTensors, config: ModelConfig, shard: Shard):
    """A block file's tensors (device form) -> the block object the math takes (block 2L is layer L's attention,
    2L + 1 its MLP)."""
    return attn_block(b, config, shard) if index % 2 == 0 else mlp_block(b, config)


class BlockStore:
    """Blocks 0..2L-1 (2*layer + phase) of one shard."""

    def __init__(self, cache: SliceCache, sizes: dict[int, int], config: ModelConfig, shard: Shard,
                 budget: int | None, io: Executor, read_rate: float | None = None,
                 page_cache_room: int | None = None) -> None:
        self.cache, self.config, self.shard = cache, config, shard
        self.window = Window([sizes[i] for i in range(len(sizes))], budget)
        kept = self.window.page_cached(page_cache_room)
        # streamed blocks whose pages are dropped from the page cache after use (so the others stay cached)
        self.uncached = frozenset(i for i in range(len(sizes)) if self.window.streamed(i) and i not in kept)
        self.io = io
        self.read_rate = read_rate
        self.blocks: dict[int, object] = {}
        self._loads: dict[int, asyncio.Future] = {}
        self.disk_read_bytes = 0
        self.read_s = 0.0
        self.stall_s = 0.0  # time compute waited for a block that was not yet read

    @property
    def total_bytes(self) -> int:
        return sum(self.window.sizes)

    @property
    def resident_bytes(self) -> int:
        return self.window.resident_bytes

    @property
    def peak_resident_bytes(self) -> int:
        return self.window.peak_bytes

    async def start(self) -> None:
        """Issue the first loads; when everything fits, wait for all of them."""
        self._issue()
        if self.window.fits:
            await asyncio.gather(*self._loads.values())

    def _issue(self) -> None:
        loop = asyncio.get_running_loop()
        for i in self.window.loads():
            self._loads[i] = loop.run_in_executor(self.io, self._read, i)

    def _read(self, i: int):
        t0 = time.perf_counter()
        # blocks that stay for good are copied in; streamed ones are mapped, so releasing them returns the pages
        tensors, n = read_block(self.cache.path(i), self.read_rate, mapped=self.window.streamed(i))
        if i in self.window.pinned:
            drop_cached_pages(self.cache.path(i))  # copied in for good: its file pages would only take room
        self.disk_read_bytes += n
        self.read_s += time.perf_counter() - t0
        return build_block(i, tensors, self.config, self.shard)

    async def get(self, i: int):
        """Block i, read first if it is not resident yet."""
        if not self.window.ready(i):
            if i not in self._loads:
                self._issue()
            fut = self._loads.get(i)
            if fut is None:
                raise RuntimeError(f"block {i} is neither resident nor loading (cursor {self.window.cursor})")
            t0 = time.perf_counter()
            try:
                block = await fut
            except BaseException:
                self.window.failed(i)
                self._loads.pop(i, None)
                raise
            self.stall_s += time.perf_counter() - t0
            self._loads.pop(i, None)
            self.blocks[i] = block
            self.window.loaded(i)
        return self.blocks[i]

    def done(self, i: int) -> None:
        """Block i's compute finished: release what the window says and prefetch what now fits."""
        if self.window.fits:
            self.window.computed(i)
            return
        released = [j for j in self.window.computed(i) if j in self.blocks]
        if released:
            # the last references go to the I/O thread, so the unmapping happens there (not on the loop, not on the
            # allreduce's critical path) and, the executor being FIFO, before the reads that reuse the room
            self.io.submit(self._release, [self.blocks.pop(j) for j in released],
                           [self.cache.path(j) for j in released if j in self.uncached])
        self._issue()

    @staticmethod
    def _release(blocks: list, uncached: list) -> None:
        blocks.clear()  # the maps close with their last tensors
        for path in uncached:
            drop_cached_pages(path)

    def rewind(self) -> None:
        """Back to block 0 (each request starts there; an aborted one may have stopped anywhere)."""
        if self.window.fits or self.window.cursor == 0:
            self.window.cursor = 0
            return  # already at block 0, with its prefetch under way: nothing to undo
        for fut in self._loads.values():
            fut.cancel()  # a read already running finishes in the I/O thread; its result is dropped
        self._loads.clear()
        dropped = [self.blocks.pop(j) for j in self.window.rewind() if j in self.blocks]
        if dropped:
            self.io.submit(dropped.clear)  # unmapped in the I/O thread, before the reads issued next (FIFO)
        self._issue()

    def close(self) -> None:
        for fut in self._loads.values():
            fut.cancel()
        self.blocks.clear()
