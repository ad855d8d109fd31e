"""Framing: a 4-byte big-endian length, then one msgpack map. Pure: bytes in, messages out.

Every message is a map with a string `t` (its type, one of MESSAGE_TYPES). Tensors travel as a map
{"dtype": str, "shape": [int...], "data": bytes}: raw little-endian bytes, never pickle.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ..errors import ProtocolError

PROTOCOL_VERSION = 4  # 2: beat frames (link liveness); 3: weight formats (load carries `format`);
# 4: KV prefix reuse (begin may carry `keep`, end `kept`)
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 2**20

# type -> required fields. The handshake's own types come first.
MESSAGE_TYPES: dict[str, tuple[str, ...]] = {
    "hello": ("version", "node", "nonce"),
    "auth": ("mac",),
    "error": ("code", "reason"),
    # control, originator -> device
    "load": ("session", "model_hash", "config", "dtype", "format", "shard", "rank", "world", "hub"),
    "need": ("session", "blocks"),  # device -> originator: stream me these blocks of my shard
    "slice": ("session", "block", "offset", "data"),  # one chunk of a block file; the last carries sha256
    "stored": ("session", "block", "offset"),  # device -> originator: chunk written, send the next
    "loaded": ("session",),  # with weight_bytes, or error
    "connect_hub": ("session", "hub"),  # originator -> worker: open your link to the hub now
    "connected": ("session",),  # with error on failure
    "attach": ("session", "rank"),  # worker -> hub: this link carries `rank` of `session`
    "attached": ("session",),
    "begin": ("session", "req", "capacity"),
    "end": ("session", "req"),
    "abort": ("session", "req", "reason"),
    "stats": ("session",),
    "stats_reply": ("session", "stats"),
    "ping": ("nonce",),
    "pong": ("nonce",),
    "beat": (),  # link liveness: sent by a side with nothing else to send (consumed by the link)
    # data path
    "step": ("session", "req", "step", "start", "x"),
    "part": ("req", "step", "layer", "phase", "rank", "x"),
    "sum": ("req", "step", "layer", "phase", "x"),
    "result": ("session", "req", "step", "x"),
}

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1}


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One message -> length-prefixed bytes."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise ProtocolError(f"outgoing {message.get('t')!r} frame of {len(body)} bytes exceeds the "
                            f"{max_frame}-byte frame limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame body -> a validated message (raises ProtocolError)."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame holds a msgpack {type(msg).__name__}, expected a map")
    kind = msg.get("t")
    if not isinstance(kind, str):
        raise ProtocolError("frame has no string 't' (message type) field")
    fields = MESSAGE_TYPES.get(kind)
    if fields is None:
        raise ProtocolError(f"unknown message type {kind[:40]!r}")
    missing = [f for f in fields if f not in msg]
    if missing:
        raise ProtocolError(f"{kind!r} message lacks field(s) {', '.join(missing)}")
    return msg


class FrameDecoder:
    """Incremental frame reader with a hard size limit; keeps at most one partial frame."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every complete message (raises ProtocolError on a bad frame)."""
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ProtocolError(f"frame length {length} exceeds the {self.max_frame}-byte limit")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            with memoryview(self._buf) as view, view[HEADER.size:end] as body:
                message = decode_body(body)  # msgpack reads the buffer in place: no copy of the body
            del self._buf[:end]  # the views are released: the buffer may shrink
            out.append(message)
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF means a truncated frame)."""
        return len(self._buf)


def tensor_record(dtype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    """The wire form of a tensor."""
    return {"dtype": dtype, "shape": list(shape), "data": data}


def check_tensor(record: Any, what: str = "tensor") -> tuple[str, list[int], bytes]:
    """Validate a tensor record: known dtype, non-negative int shape, byte count that matches."""
    if not isinstance(record, dict):
        raise ProtocolError(f"{what} is not a tensor record")
    dtype, shape, data = record.get("dtype"), record.get("shape"), record.get("data")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ProtocolError(f"{what} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 8:
        raise ProtocolError(f"{what} has a malformed shape {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what} data is not bytes")
    n = DTYPE_SIZES[dtype]
    for s in shape:
        n *= s
    if n != len(data):
        raise ProtocolError(f"{what} of shape {shape} and dtype {dtype} needs {n} bytes, got {len(data)}")
    return dtype, shape, data
