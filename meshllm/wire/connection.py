"""Connection: framing plus the mutual HMAC handshake, Sans-I/O (`receive_data` / `data_to_send`).

Handshake, symmetric except for the role label bound into each proof:
    both sides   -> hello {version, node, nonce (32 random bytes), info}
    on hello     -> check version, refuse our own node id;
                    auth {mac = HMAC-SHA256(secret, len-prefixed label, role, nonce_i, nonce_r, node_i, node_r)}
    on auth      -> verify the peer's mac for the peer's role; then the link is ready
A wrong secret or version makes the refusing side send `error {code, reason}` before closing, so both ends
raise the same clear error. Binding role, both nonces and both node ids stops reflection and replay.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ..errors import AuthenticationError, HandshakeError, ProtocolError, RemoteError, VersionMismatchError
from .frames import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, FrameDecoder, encode_frame

_LABEL = b"meshllm-handshake-v1"
HANDSHAKE_MAX_FRAME = 64 * 1024
SECRET_HINT = "use the same --secret (or MESHLLM_SECRET) on every device of the mesh"


def _mac(secret: bytes, role: bytes, nonce_i: bytes, nonce_r: bytes, node_i: str, node_r: str) -> bytes:
    # every field length-prefixed: peer-chosen fields cannot be shifted into one another
    fields = (_LABEL, role, nonce_i, nonce_r, node_i.encode(), node_r.encode())
    msg = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    return hmac.new(secret, msg, hashlib.sha256).digest()


class Connection:
    """One link's protocol state. Feed it bytes; it returns messages and queues bytes to send."""

    def __init__(self, secret: bytes, node_id: str, nonce: bytes, *, initiator: bool,
                 info: dict[str, Any] | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 version: int = PROTOCOL_VERSION) -> None:
        if len(nonce) < 16:
            raise ValueError("nonce must be at least 16 random bytes")
        self.secret, self.node_id, self.nonce = secret, node_id, nonce
        self.initiator = initiator
        self.version = version
        self.max_frame = max_frame
        self.info = info or {}
        self.peer_id: str | None = None
        self.peer_info: dict[str, Any] = {}
        self.state = "new"  # new -> hello_sent -> auth_sent -> ready | closed
        self._peer_nonce: bytes | None = None
        # until the peer has proved the secret, frames are small: a stranger cannot make us buffer megabytes
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._out: list[bytes] = []
        self.bytes_in = self.bytes_out = 0

    # -- output ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue our hello (call once, on connect)."""
        self._queue({"t": "hello", "version": self.version, "node": self.node_id, "nonce": self.nonce,
                     "info": self.info})
        self.state = "hello_sent"

    def send(self, message: dict[str, Any]) -> None:
        """Queue an application message (only once the handshake is done)."""
        if self.state != "ready":
            raise HandshakeError(f"cannot send {message.get('t')!r} before the handshake completes")
        self._queue(message)

    def encode(self, message: dict[str, Any]) -> bytes:
        """Frame an application message without queueing it (for the fast path)."""
        data = encode_frame(message, self.max_frame)
        self.bytes_out += len(data)
        return data

    def data_to_send(self) -> bytes:
        """Bytes queued for the peer, in order."""
        out, self._out = b"".join(self._out), []
        return out

    def _queue(self, message: dict[str, Any]) -> None:
        self._out.append(self.encode(message))

    def close_with_error(self, code: str, reason: str) -> None:
        """Queue an error frame for the peer; the caller closes after flushing."""
        if self.state != "closed":
            self._out.append(encode_frame({"t": "error", "code": code, "reason": reason}, self.max_frame))
            self.state = "closed"

    # -- input -----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Bytes from the peer -> application messages. Raises LinkError subclasses; the link is then done."""
        if self.state == "closed":
            return []
        self.bytes_in += len(data)
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as e:
            self.close_with_error("protocol", str(e))
            raise
        out = []
        for msg in messages:
            if self.state == "ready":
                if msg["t"] in ("hello", "auth"):
                    self.close_with_error("protocol", f"unexpected {msg['t']!r} after the handshake")
                    raise ProtocolError(f"peer {self.peer_id} sent {msg['t']!r} after the handshake")
                if msg["t"] == "error":
                    self.state = "closed"
                    raise RemoteError(f"peer {self.peer_id} closed the link: {msg['reason']}")
                out.append(msg)
            else:
                self._handshake(msg)
        return out

    def receive_eof(self) -> None:
        """The peer closed; raise if it left a partial frame or an unfinished handshake."""
        if self.state == "closed":
            return
        if self._decoder.pending:
            raise ProtocolError(f"connection closed inside a frame ({self._decoder.pending} bytes of a truncated "
                                f"frame)")
        if self.state not in ("ready", "closed"):
            raise HandshakeError("peer closed the connection during the handshake")

    def _handshake(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "error":
            self.state = "closed"
            code, reason = msg.get("code"), str(msg.get("reason"))
            if code == "auth":
                raise AuthenticationError(f"refused by the peer: {reason}")
            if code == "version":
                raise VersionMismatchError(f"refused by the peer: {reason}")
            raise HandshakeError(f"refused by the peer: {reason}")
        if kind == "hello" and self._peer_nonce is None:
            version, node, nonce = msg["version"], msg["node"], msg["nonce"]
            if version != self.version:
                reason = (f"protocol version mismatch: this device speaks version {self.version}, the peer version "
                          f"{version}; run the same meshllm release on every device")
                self.close_with_error("version", reason)
                raise VersionMismatchError(reason)
            if not isinstance(node, str) or not isinstance(nonce, bytes) or len(nonce) < 16:
                self.close_with_error("protocol", "malformed hello")
                raise ProtocolError("peer sent a malformed hello")
            if node == self.node_id:
                # a peer claiming our own id could replay proofs we make on another link
                self.close_with_error("auth", "peer claims this device's own node id")
                raise AuthenticationError(f"peer claims this device's own node id {node!r}; refused")
            self.peer_id, self._peer_nonce = node, nonce
            info = msg.get("info")
            self.peer_info = info if isinstance(info, dict) else {}
            self._queue({"t": "auth", "mac": self._proof(mine=True)})
            self.state = "auth_sent"
            return
        if kind == "auth" and self.state == "auth_sent":
            mac = msg["mac"]
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, self._proof(mine=False)):
                reason = f"authentication failed: device {self.peer_id!r} holds a different mesh secret; {SECRET_HINT}"
                self.close_with_error("auth", f"authentication failed: the mesh secrets differ; {SECRET_HINT}")
                raise AuthenticationError(reason)
            self.state = "ready"
            self._decoder.max_frame = self.max_frame
            return
        self.close_with_error("protocol", f"unexpected {kind!r} during the handshake")
        raise ProtocolError(f"peer sent {kind!r} during the handshake (state {self.state})")

    def _proof(self, mine: bool) -> bytes:
        assert self._peer_nonce is not None and self.peer_id is not None
        if self.initiator:
            ni, nr, idi, idr = self.nonce, self._peer_nonce, self.node_id, self.peer_id
        else:
            ni, nr, idi, idr = self._peer_nonce, self.nonce, self.peer_id, self.node_id
        i_am = b"initiator" if self.initiator else b"responder"
        they_are = b"responder" if self.initiator else b"initiator"
        return _mac(self.secret, i_am if mine else they_are, ni, nr, idi, idr)
