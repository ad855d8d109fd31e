"""The TXT record a device advertises, pure: encode, decode (rejecting garbage), and the mesh id.

A record carries what choosing a hub and a split needs before any link is opened: node id, protocol version, mesh
id, and capability (score, cores, memory available, free disk for the slice cache, weight budget). The mesh id is
derived from the secret's scrypt-stretched key, so it tells meshes apart without revealing the secret (a
guessable secret stays guessable: make one with `meshllm secret`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from dataclasses import asdict, dataclass, field

from ..wire.keys import mesh_key

SERVICE_TYPE = "_meshllm._tcp.local."
MAX_VALUE = 64  # bytes of one TXT value; a record is a few hundred bytes in all (one mDNS packet)


class RecordError(ValueError):
    """A TXT record that is not a meshllm record (or not one we understand)."""


@functools.lru_cache(maxsize=8)
def mesh_id(secret: bytes) -> str:
    """16 hex digits naming the mesh of `secret`: an HMAC under the scrypt-stretched mesh key, so that testing a
    guessed secret against an advertised id costs a scrypt, as against a handshake (blocking the first time)."""
    return hmac.new(mesh_key(secret), b"meshllm mesh id v2", hashlib.sha256).digest()[:8].hex()


@dataclass(frozen=True)
class PeerRecord:
    """One advertised device."""

    node_id: str
    version: int
    mesh: str
    score: float  # higher is stronger: the measured decode bandwidth, GB/s of weights streamed
    cores: int
    memory_bytes: int  # available to this device (the smaller of free RAM and its cgroup limit)
    disk_bytes: int  # free in its slice cache folder
    budget_bytes: int | None = None  # its --memory-budget for weights, if any
    addresses: tuple[str, ...] = field(default=())
    port: int = 0

    @property
    def address(self) -> str:
        """host:port to connect to (the first advertised address)."""
        return f"{self.addresses[0]}:{self.port}" if self.addresses else ""

    def properties(self) -> dict[str, str]:
        """The TXT key/values advertised."""
        p = {"id": self.node_id, "v": str(self.version), "mesh": self.mesh, "score": f"{self.score:.3f}",
             "cores": str(self.cores), "mem": str(self.memory_bytes), "disk": str(self.disk_bytes)}
        if self.budget_bytes is not None:
            p["budget"] = str(self.budget_bytes)
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        d["addresses"] = list(self.addresses)
        d["address"] = self.address
        return d


def valid_node_id(text: str) -> bool:
    """Letters, digits, '-', '_' and '.' (ASCII), at least one."""
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "-_.") for c in text)


def _text(props: dict, key: str, required: bool = True) -> str | None:
    raw = props.get(key.encode(), props.get(key))
    if raw is None:
        if required:
            raise RecordError(f"no {key!r} key")
        return None
    if isinstance(raw, bytes):
        if len(raw) > MAX_VALUE:
            raise RecordError(f"{key!r} is {len(raw)} bytes long")
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise RecordError(f"{key!r} is not ASCII") from None
    if not isinstance(raw, str) or not raw or len(raw) > MAX_VALUE:
        raise RecordError(f"{key!r} is empty or too long")
    return raw


def _int(props: dict, key: str, required: bool = True) -> int | None:
    text = _text(props, key, required)
    if text is None:
        return None
    if not text.isdigit():
        raise RecordError(f"{key!r} is not a non-negative integer: {text!r}")
    return int(text)


def decode(props: dict, addresses: tuple[str, ...] = (), port: int = 0) -> PeerRecord:
    """TXT properties (bytes or str keys/values) -> PeerRecord; RecordError names what is wrong."""
    node_id = _text(props, "id")
    if not valid_node_id(node_id):
        raise RecordError(f"'id' has characters outside [A-Za-z0-9-_.]: {node_id!r}")
    mesh = _text(props, "mesh")
    if len(mesh) != 16 or any(c not in "0123456789abcdef" for c in mesh):
        raise RecordError(f"'mesh' is not 16 hex digits: {mesh!r}")
    try:
        score = float(_text(props, "score"))
    except ValueError:
        raise RecordError("'score' is not a number") from None
    if not math.isfinite(score) or score <= 0:
        raise RecordError(f"'score' must be a positive number, got {score}")
    if not 0 < port < 65536:
        raise RecordError(f"port {port} is out of range")
    return PeerRecord(node_id=node_id, version=_int(props, "v"), mesh=mesh, score=score,
                      cores=_int(props, "cores"), memory_bytes=_int(props, "mem"), disk_bytes=_int(props, "disk"),
                      budget_bytes=_int(props, "budget", required=False), addresses=tuple(addresses), port=port)


def elect(records) -> PeerRecord | None:
    """The hub among records: the plan's own election (highest score, ties to the smallest node id)."""
    from ..cluster.plan import DeviceSpec, elect_hub

    records = list(records)
    if not records:
        return None
    return records[elect_hub([DeviceSpec(r.node_id, r.score) for r in records])]
