"""Connection: framing, the mutual handshake and sealed frames, Sans-I/O (`receive_data` / `data_to_send`).

Handshake, symmetric except for the role label bound into each proof:
    both sides   -> hello {version, node, nonce (32 random bytes), key (ephemeral X25519 public), ciphers, info}
    on hello     -> check version, refuse our own node id; derive the link's keys (wire/keys.py: HKDF of the X25519
                    value, salted with the scrypt-stretched mesh key, bound to both nonces, ids, keys and cipher lists);
                    auth {mac = HMAC-SHA256(proof key, our role)}
    on auth      -> verify the peer's mac for the peer's role; then the link is ready, and every later frame in each
                    direction is sealed (AEAD, counter nonce, the length header as associated data)
A wrong secret or version makes the refusing side send `error {code, reason}` before closing, so both ends
raise the same clear error. Binding role, both nonces, ids and keys stops reflection, replay and a relay in the
middle; a stranger who connects learns a proof it can check a guessed secret against only at one scrypt per guess.
"""

from __future__ import annotations

import hmac
from typing import Any

from ..errors import (AuthenticationError, HandshakeError, IntegrityError, ProtocolError, RemoteError,
                      VersionMismatchError)
from .frames import DEFAULT_MAX_FRAME, HEADER, PROTOCOL_VERSION, FrameDecoder, decode_body, encode_body
from .keys import TAG, Ephemeral, Opener, Sealer, choose_cipher, link_keys, local_ciphers, mesh_key, proof, transcript

HANDSHAKE_MAX_FRAME = 64 * 1024
SECRET_HINT = "use the same --secret (or MESHLLM_SECRET) on every device of the mesh"


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
        self.ciphers = list(local_ciphers())  # offered, fastest first
        self.cipher: str | None = None  # agreed
        self._ephemeral: Ephemeral | None = Ephemeral()
        self._hello_key = self._ephemeral.public
        self._peer_nonce: bytes | None = None
        self._proofs: tuple[bytes, bytes] | None = None  # (ours, the peer's)
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._keys: tuple[bytes, bytes] | None = None  # (our sending key, our receiving key) until ready
        # until the peer has proved the secret, frames are small: a stranger cannot make us buffer megabytes
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._out: list[bytes] = []
        self.bytes_in = self.bytes_out = 0

    # -- output ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue our hello (call once, on connect)."""
        self._queue({"t": "hello", "version": self.version, "node": self.node_id, "nonce": self.nonce,
                     "key": self._hello_key, "ciphers": self.ciphers, "info": self.info})
        self.state = "hello_sent"

    def send(self, message: dict[str, Any]) -> None:
        """Queue an application message (only once the handshake is done)."""
        if self.state != "ready":
            raise HandshakeError(f"cannot send {message.get('t')!r} before the handshake completes")
        self._queue(message)

    def encode(self, message: dict[str, Any]) -> bytes:
        """Frame (and, once ready, seal) a message without queueing it (for the fast path)."""
        return self.frame(encode_body(message, self.max_frame))

    def frame(self, body: bytes) -> bytes | bytearray:
        """Length-prefix (and, once ready, seal) an encoded body: one encoding can go to several links."""
        if self._sealer is None:
            data = HEADER.pack(len(body)) + body
        else:
            data = self._sealer.frame(HEADER.pack(len(body) + TAG), body)
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
            self._out.append(self.encode({"t": "error", "code": code, "reason": reason[:4096]}))
            self.state = "closed"

    # -- input -----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Bytes from the peer -> application messages. Raises LinkError subclasses; the link is then done."""
        if self.state == "closed":
            return []
        self.bytes_in += len(data)
        out: list[dict[str, Any]] = []
        try:
            self._decoder.feed_frames(data, lambda header, body: self._frame(header, body, out))
        except IntegrityError as e:
            err = IntegrityError(f"link from {self.peer_id}: {e}")
            self.close_with_error("integrity", str(err))  # sealed: the peer learns why, if the path lets it through
            raise err from None
        except ProtocolError as e:
            self.close_with_error("protocol", str(e))
            raise
        return out

    def _frame(self, header: bytes, body: memoryview, out: list[dict[str, Any]]) -> None:
        if self.state == "closed":
            return  # the rest of a chunk after an error frame
        if self._opener is not None:
            msg = decode_body(self._opener.open(header, body))
        else:
            msg = decode_body(body)  # msgpack reads the buffer in place: no copy of the body
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
            key, ciphers = msg.get("key"), msg.get("ciphers")
            if (not isinstance(node, str) or not 0 < len(node) <= 256 or not isinstance(nonce, bytes)
                    or not 16 <= len(nonce) <= 64 or not isinstance(key, bytes) or len(key) != 32
                    or not isinstance(ciphers, list) or len(ciphers) > 8
                    or not all(isinstance(c, str) for c in ciphers)):
                self.close_with_error("protocol", "malformed hello")
                raise ProtocolError("peer sent a malformed hello")
            if node == self.node_id:
                # a peer claiming our own id could replay proofs we make on another link
                self.close_with_error("auth", "peer claims this device's own node id")
                raise AuthenticationError(f"peer claims this device's own node id {node!r}; refused")
            cipher = choose_cipher(self.ciphers if self.initiator else ciphers,
                                   ciphers if self.initiator else self.ciphers)
            if cipher is None:
                reason = (f"no cipher in common: this device offers {', '.join(self.ciphers)}, the peer "
                          f"{', '.join(ciphers)[:200]}")
                self.close_with_error("version", reason)
                raise VersionMismatchError(reason)
            try:
                self._derive(node, nonce, key, ciphers)
            except ValueError:  # a low-order X25519 point: no shared secret
                self.close_with_error("protocol", "malformed hello")
                raise ProtocolError("peer sent a malformed hello (a degenerate X25519 key)") from None
            self.peer_id, self._peer_nonce, self.cipher = node, nonce, cipher
            info = msg.get("info")
            self.peer_info = info if isinstance(info, dict) else {}
            assert self._proofs is not None
            self._queue({"t": "auth", "mac": self._proofs[0]})
            self.state = "auth_sent"
            return
        if kind == "auth" and self.state == "auth_sent":
            mac = msg["mac"]
            assert self._proofs is not None and self._keys is not None and self.cipher is not None
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, self._proofs[1]):
                reason = f"authentication failed: device {self.peer_id!r} holds a different mesh secret; {SECRET_HINT}"
                self.close_with_error("auth", f"authentication failed: the mesh secrets differ; {SECRET_HINT}")
                raise AuthenticationError(reason)
            self.state = "ready"
            # every later frame is sealed, both ways: our auth was our last clear frame, the peer's was theirs
            self._sealer, self._opener = Sealer(self.cipher, self._keys[0]), Opener(self.cipher, self._keys[1])
            self._keys = None
            self._decoder.max_frame = self.max_frame + TAG
            return
        self.close_with_error("protocol", f"unexpected {kind!r} during the handshake")
        raise ProtocolError(f"peer sent {kind!r} during the handshake (state {self.state})")

    def _derive(self, node: str, nonce: bytes, key: bytes, ciphers: list[str]) -> None:
        """Both proofs and both direction keys, from the X25519 value, the mesh key and the whole exchange."""
        assert self._ephemeral is not None
        shared = self._ephemeral.shared(key)
        self._ephemeral = None  # forward secrecy: the private half is not needed again
        mine = (self.nonce, self.node_id.encode(), self._hello_key, ",".join(self.ciphers).encode())
        theirs = (nonce, node.encode(), key, ",".join(ciphers).encode())
        i, r = (mine, theirs) if self.initiator else (theirs, mine)
        context = transcript(*(f for pair in zip(i, r) for f in pair))
        proof_key, i_to_r, r_to_i = link_keys(mesh_key(self.secret), shared, context)
        i_proof, r_proof = proof(proof_key, b"initiator"), proof(proof_key, b"responder")
        self._proofs = (i_proof, r_proof) if self.initiator else (r_proof, i_proof)
        self._keys = (i_to_r, r_to_i) if self.initiator else (r_to_i, i_to_r)
