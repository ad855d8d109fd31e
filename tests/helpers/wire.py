"""Captured link bytes split into frames, and a relay that records (and may alter) them: for tests of the wire."""

from __future__ import annotations

import asyncio

import msgpack

from meshllm.wire.frames import HEADER


def split_frames(data: bytes) -> list[dict]:
    """Every complete frame in `data`, decoded; a trailing partial frame is ignored."""
    out, pos = [], 0
    while pos + HEADER.size <= len(data):
        (n,) = HEADER.unpack_from(data, pos)
        out.append(msgpack.unpackb(data[pos + HEADER.size:pos + HEADER.size + n], raw=False))
        pos += HEADER.size + n
    return out


def frame_bodies(data: bytes) -> list[bytes]:
    """Every complete frame body in `data`, as bytes (sealed or not); a trailing partial frame is ignored."""
    out, pos = [], 0
    while pos + HEADER.size <= len(data):
        (n,) = HEADER.unpack_from(data, pos)
        if pos + HEADER.size + n > len(data):
            break
        out.append(data[pos + HEADER.size:pos + HEADER.size + n])
        pos += HEADER.size + n
    return out


def handshake_and_sealed(data: bytes) -> tuple[list[dict], list[bytes]]:
    """One direction of a link: its clear handshake frames (hello, auth), then the sealed bodies after them."""
    bodies = frame_bodies(data)
    clear = [msgpack.unpackb(b, raw=False) for b in bodies[:2]]
    return clear, bodies[2:]


class Relay:
    """A TCP relay to `target` that passes whole frames, after `edit(direction, n, frame) -> [frames]` (n counts the
    frames of that direction, handshake included: 0 hello, 1 auth, 2.. sealed). It records every byte."""

    def __init__(self, target: str, edit=None) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port, self.edit = int(port), edit or (lambda d, n, f: [f])
        self.seen = {"up": bytearray(), "down": bytearray()}  # up: originator -> device
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for w in self.writers:
            w.close()

    async def _handle(self, reader, writer) -> None:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
        self.writers += [writer, up_w]
        await asyncio.gather(self._pump("up", reader, up_w), self._pump("down", up_r, writer))

    async def _pump(self, direction: str, src, dst) -> None:
        buf, n = bytearray(), 0
        try:
            while data := await src.read(1 << 16):
                self.seen[direction] += data
                buf += data
                while len(buf) >= HEADER.size and len(buf) >= HEADER.size + HEADER.unpack_from(buf)[0]:
                    end = HEADER.size + HEADER.unpack_from(buf)[0]
                    for frame in self.edit(direction, n, bytes(buf[:end])):
                        dst.write(frame)
                    del buf[:end]
                    n += 1
        except ConnectionError:
            pass
        finally:
            dst.close()
