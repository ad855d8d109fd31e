"""StarGroup: a standalone star allreduce group over TCP, one member per process (or per task).

Devices embed StarAllreduce in their sessions; this wraps the same driver with its own links, for benchmarks
and tests of the collective alone: `async with StarGroup(rank, world, secret, port=...) as g: await g(key, t)`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from ..errors import MeshTimeoutError, ProtocolError
from ..net.link import Link, Timeouts, connect, new_connection
from ..wire.keys import prepare_async
from .driver import StarAllreduce


class StarGroup:
    """Member `rank` of a star group whose hub (rank 0) listens on host:port."""

    def __init__(self, rank: int, world: int, secret: bytes, *, host: str = "127.0.0.1", port: int = 0,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.rank, self.world, self.secret = rank, world, secret
        self.host, self.port = host, port
        self.timeouts = timeouts
        self.reduce = StarAllreduce(rank, world, 0, timeouts.allreduce)
        self.reduce.begin(2**62)  # no originator here: every request is begun
        self._server: asyncio.Server | None = None
        self._all_attached: asyncio.Future | None = None
        self._attached: asyncio.Future | None = None
        self.links: list[Link] = []

    async def __aenter__(self) -> "StarGroup":
        loop = asyncio.get_running_loop()
        await prepare_async(self.secret)  # the mesh key, before the first link needs it
        if self.rank == 0:
            self._all_attached = loop.create_future()
            if self.world == 1:
                self._all_attached.set_result(None)
            self._server = await loop.create_server(self._accept, self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start(self, timeout: float = 30.0) -> None:
        """Hub: wait for every worker to attach. Worker: connect to the hub and attach."""
        if self.rank == 0:
            try:
                await asyncio.wait_for(self._all_attached, timeout)
            except TimeoutError as e:
                raise MeshTimeoutError(f"only {len(self.reduce.worker_links)} of {self.world - 1} workers attached "
                                       f"within {timeout} s") from e
            return
        self._attached = asyncio.get_running_loop().create_future()
        link = await connect(self.host, self.port, self.secret, f"star-{self.rank}", timeouts=self.timeouts,
                             on_message=self._on_message)
        self.links.append(link)
        self.reduce.hub_link = link
        link.send({"t": "attach", "session": "star", "rank": self.rank})
        await asyncio.wait_for(self._attached, timeout)

    def _accept(self) -> Link:
        link = Link(new_connection(self.secret, "star-0", initiator=False), self._on_message, timeouts=self.timeouts)
        self.links.append(link)
        return link

    def _on_message(self, link: Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "part":
            self.reduce.on_part(link, msg)
        elif kind == "sum":
            self.reduce.on_sum(msg)
        elif kind == "attach" and self.rank == 0:
            rank = msg["rank"]
            if not self.reduce.attach(rank, link):
                raise ProtocolError(f"bad attach for rank {rank!r}")
            link.send({"t": "attached", "session": "star"})
            if len(self.reduce.worker_links) == self.world - 1:
                self._all_attached.set_result(None)
        elif kind == "attached" and self._attached is not None and not self._attached.done():
            self._attached.set_result(None)
        else:
            raise ProtocolError(f"unexpected {kind!r} in a star group")

    async def __call__(self, key: tuple[int, int, int, int], part: torch.Tensor) -> torch.Tensor:
        return await self.reduce(key, part)

    async def __aexit__(self, *exc) -> None:
        for link in self.links:
            link.close()
        if self._server is not None:
            self._server.close()
