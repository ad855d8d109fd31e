"""Split captured link bytes into the msgpack messages they carry (for tests that inspect the wire)."""

from __future__ import annotations

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
