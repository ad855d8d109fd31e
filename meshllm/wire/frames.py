"""Framing: a 4-byte big-endian length, then one msgpack map. Pure: bytes in, messages out.

After the handshake the map is sealed (wire/keys.py): the length then counts the ciphertext and its tag.
Unpacking is bounded: no frame unpacks into more than a small multiple of its own size (LIMITS).

Every message is a map with a string `t` (its type, one of MESSAGE_TYPES). Tensors travel as a map
{"dtype": str, "shape": [int...], "data": bytes}: raw little-endian bytes, never pickle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from ..errors import ProtocolError

PROTOCOL_VERSION = 5  # 2: beat frames (link liveness); 3: weight formats (load carries `format`);
# 4: KV prefix reuse (begin may carry `keep`, end `kept`); 5: sealed links (hello carries an X25519 key and ciphers)
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
    "probe": ("nonce", "peers"),  # originator -> device: time round trips to these devices (for the planner)
    "probe_reply": ("nonce", "rtt_s"),
    "beat": (),  # link liveness: sent by a side with nothing else to send (consumed by the link)
    # data path
    "step": ("session", "req", "step", "start", "x"),
    "part": ("req", "step", "layer", "phase", "rank", "x"),
    "sum": ("req", "step", "layer", "phase", "x"),
    "result": ("session", "req", "step", "x"),
}

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1}


def encode_body(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One message -> its msgpack body (raises ProtocolError past the frame limit)."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise ProtocolError(f"outgoing {message.get('t')!r} frame of {len(body)} bytes exceeds the "
                            f"{max_frame}-byte frame limit")
    return body


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One message -> length-prefixed bytes (unsealed: the handshake's frames)."""
    body = encode_body(message, max_frame)
    return HEADER.pack(len(body)) + body


@dataclass(frozen=True)
class UnpackLimits:
    """What one frame may unpack into. Our largest arrays are a shard's block list; our maps are a model config.

    Every container costs Python far more than its msgpack bytes (an empty array is 1 byte on the wire and 56 in
    memory): containers and their items are counted per frame, so a frame of any size unpacks into at most a few
    MB of objects beyond its own strings and bytes."""

    containers: int = 4096  # arrays and maps in one frame
    items: int = 65536  # array items plus map entries in one frame
    string: int = 1 << 20  # bytes of one string


LIMITS = UnpackLimits()


class _Budget:
    """msgpack hooks that count what a frame has unpacked and stop it at the limits."""

    __slots__ = ("containers", "items", "limits")

    def __init__(self, limits: UnpackLimits) -> None:
        self.containers = self.items = 0
        self.limits = limits

    def _count(self, n: int) -> None:
        self.containers += 1
        self.items += n
        if self.containers > self.limits.containers:
            raise ProtocolError(f"frame holds more than {self.limits.containers} arrays and maps")
        if self.items > self.limits.items:
            raise ProtocolError(f"frame holds more than {self.limits.items} array items and map entries")

    def array(self, items: list) -> list:
        self._count(len(items))
        return items

    def map(self, pairs: list) -> dict:
        self._count(len(pairs))
        return dict(pairs)


def decode_body(body: bytes, limits: UnpackLimits = LIMITS) -> dict[str, Any]:
    """One frame body -> a validated message (raises ProtocolError)."""
    budget = _Budget(limits)
    try:
        # the per-container caps stop one huge array or map before it is built; the hooks cap the total
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, list_hook=budget.array,
                              object_pairs_hook=budget.map, max_array_len=limits.items,
                              max_map_len=limits.items, max_str_len=limits.string, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad input
        if isinstance(e, ValueError) and "exceeds max_" in str(e):
            raise ProtocolError(f"frame exceeds an unpack limit: {e}") from e
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
        out: list[dict[str, Any]] = []
        self.feed_frames(data, lambda header, body: out.append(decode_body(body)))
        return out

    def feed_frames(self, data: bytes, handle: Callable[[bytes, memoryview], None]) -> None:
        """Add bytes; call `handle(header, body)` for each complete frame, in order. `body` is a view into the
        buffer, valid only during the call (msgpack and the AEAD read it in place: no copy). `max_frame` may
        change between calls of `handle` (the handshake raises it)."""
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ProtocolError(f"frame length {length} exceeds the {self.max_frame}-byte limit")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            header = bytes(self._buf[:HEADER.size])
            with memoryview(self._buf) as view, view[HEADER.size:end] as body:
                handle(header, body)
            del self._buf[:end]  # the views are released: the buffer may shrink

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
