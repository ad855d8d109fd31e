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
