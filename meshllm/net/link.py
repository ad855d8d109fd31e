"""The thin asyncio layer: a TCP link driven by the Sans-I/O Connection. It only moves bytes.

Flow control: the kernel socket plus a bounded transport write buffer (a peer that leaves `write_limit` bytes,
WRITE_LIMIT by default, unread is cut off); inbound, a message is handed to the owner's callback as soon as its
frame completes, and the owner keeps every queue it fills bounded. TCP_NODELAY, because every frame on the data
path is latency-bound.

Liveness: once authenticated, a link sends a `beat` frame whenever it has sent nothing for a while, and closes when
its peer has sent nothing at all for `Timeouts.silence` seconds. A peer that hangs, sleeps or is cut off without a
FIN is then found in seconds, on idle links too, instead of at the next step's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DeviceLostError, HandshakeError, LinkError, MeshTimeoutError, ProtocolError
from ..wire.connection import Connection
from ..wire.frames import DEFAULT_MAX_FRAME, encode_body
from ..wire.keys import prepare_async

log = logging.getLogger("meshllm.net")


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed per phase."""

    connect: float = 5.0
    handshake: float = 5.0
    load: float = 900.0  # reading (or receiving) a shard's weights
    step: float = 120.0  # one forward step end to end, as seen by the originator
    allreduce: float = 60.0  # one round, as seen by a worker or the hub
    close: float = 2.0
    beat: float = 2.0  # an authenticated link with nothing else to send sends a beat this often
    silence: float = 10.0  # nothing at all from the peer for this long: it is gone (must exceed 1.5 x its beat)


WRITE_LIMIT = 256 * 2**20  # default: a peer this far behind is not reading: the link is closed


class Link(asyncio.Protocol):
    """One authenticated link. `on_message(link, msg)` runs on the loop for each message; keep it quick."""

    def __init__(self, conn: Connection, on_message: Callable[["Link", dict[str, Any]], None] | None = None,
                 on_close: Callable[["Link", BaseException | None], None] | None = None,
                 timeouts: Timeouts = Timeouts(), write_limit: int = WRITE_LIMIT,
                 admit: Callable[["Link"], bool] | None = None) -> None:
        self.conn = conn
        self.admit = admit  # on an accepted connection: False resets it at once (nothing read, nothing sent)
        self.on_message = on_message
        self.on_close = on_close
        self.timeouts = timeouts
        self.write_limit = write_limit
        self.transport: asyncio.Transport | None = None
        self.address = self.host = ""
        self.error: BaseException | None = None
        self._loop = loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._last_in = self._last_out = loop.time()
        self._beat_timer: asyncio.TimerHandle | None = None

    # -- identity ---------------------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        """The peer's node id and address, for messages."""
        return f"{self.conn.peer_id or '?'} ({self.address})"

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else "?"
        self.address = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.admit is not None and not self.admit(self):
            self.error = HandshakeError(f"connection from {self.address} refused: too many unauthenticated ones")
            transport.abort()  # the descriptor is freed now, not after a handshake timeout
            return
        self.conn.start()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._last_in = self._loop.time()
        was_ready = self.conn.state == "ready"
        try:
            messages = self.conn.receive_data(data)
        except LinkError as e:
            self._flush()
            self._fail(e)
            return
        self._flush()
        if not was_ready and self.conn.state == "ready" and not self.ready.done():
            self.ready.set_result(None)
            self._beat_timer = self._loop.call_later(self.timeouts.beat / 2, self._beat)
        for msg in messages:
            if self.closed.done():
                return
            if msg["t"] == "beat":
                continue  # its arrival was the point
            if self.on_message is not None:
                try:
                    self.on_message(self, msg)
                except Exception as e:
                    # a protocol violation (or a field of the wrong type): close this link only, never the process
                    if not isinstance(e, (LinkError, TypeError, ValueError, KeyError)):
                        log.exception("a %r message from %s broke its handler", msg.get("t"), self.peer)
                    if not isinstance(e, LinkError):
                        e = ProtocolError(f"malformed {msg.get('t')!r} message: {type(e).__name__}: {e}")
                    self.refuse(e)
                    return

    def eof_received(self) -> bool:
        try:
            self.conn.receive_eof()
        except LinkError as e:
            self._fail(e)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            err = self.error or DeviceLostError(f"link to {self.peer} closed" + (f": {exc}" if exc else ""))
            self._finish(err)

    # -- sending --------------------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Frame and write one message now (never blocks)."""
        self.write_frame(self.conn.encode(message))

    def write_frame(self, frame: bytes) -> None:
        """Write an already framed message (one encoding shared by several links)."""
        if self.closed.done() or self.transport is None:
            raise self.error or DeviceLostError(f"link to {self.peer} is closed")
        queued = self.transport.get_write_buffer_size()
        if queued > self.write_limit:
            err = ProtocolError(f"{self.peer} does not read what we send ({queued} bytes queued, over the limit of "
                                f"{self.write_limit})")
            self._fail(err)
            raise err
        self.transport.write(frame)
        self._last_out = self._loop.time()

    def _beat(self) -> None:
        """Every half beat: close the link if the peer has been silent too long; send a beat if we have been."""
        if self.closed.done():
            return
        now = self._loop.time()
        if now - self._last_in > self.timeouts.silence:
            self._fail(DeviceLostError(f"no word from {self.peer} for {self.timeouts.silence:g} s: it hangs, "
                                       f"sleeps or is cut off"))
            return
        if now - self._last_out >= self.timeouts.beat / 2:
            try:
                self.send({"t": "beat"})
            except LinkError:
                return  # closed by the write limit: already failed
        self._beat_timer = self._loop.call_later(self.timeouts.beat / 2, self._beat)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- closing --------------------------------------------------------------------------------------------

    def close(self, error: BaseException | None = None) -> None:
        """Close the link (after writing anything queued)."""
        if error is not None and self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        if not self.closed.done():
            self._finish(self.error or DeviceLostError(f"link to {self.peer} closed"))

    def refuse(self, error: LinkError, code: str = "protocol") -> None:
        """Close the link, telling the peer why in an error frame (it raises the reason as a RemoteError)."""
        self.conn.close_with_error(code, str(error))
        self._flush()
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        log.info("closing link to %s: %s", self.peer, error)
        self.error = self.error or error
        if self.transport is not None:
            self.transport.close()
        self._finish(self.error)

    def _finish(self, error: BaseException) -> None:
        self.error = self.error or error
        if self._beat_timer is not None:
            self._beat_timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(self.error)
            self.ready.exception()  # retrieved: nobody may be waiting on it
        self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self, self.error)


def new_connection(secret: bytes, node_id: str, *, initiator: bool, info: dict[str, Any] | None = None,
                   max_frame: int = DEFAULT_MAX_FRAME) -> Connection:
    """A Connection with a fresh random nonce."""
    return Connection(secret, node_id, os.urandom(32), initiator=initiator, info=info, max_frame=max_frame)


async def connect(host: str, port: int, secret: bytes, node_id: str, *, timeouts: Timeouts = Timeouts(),
                  info: dict[str, Any] | None = None, on_message=None, on_close=None,
                  max_frame: int = DEFAULT_MAX_FRAME, write_limit: int = WRITE_LIMIT) -> Link:
    """Open an authenticated link to host:port (raises HandshakeError subclasses, DeviceLostError, timeouts)."""
    loop = asyncio.get_running_loop()
    await prepare_async(secret)  # the mesh key: stretched once per process, off the loop
    conn = new_connection(secret, node_id, initiator=True, info=info, max_frame=max_frame)
    try:
        _, link = await asyncio.wait_for(loop.create_connection(
            lambda: Link(conn, on_message, on_close, timeouts, write_limit), host, port), timeouts.connect)
    except TimeoutError as e:
        raise MeshTimeoutError(f"connecting to {host}:{port} timed out after {timeouts.connect} s") from e
    except OSError as e:
        raise DeviceLostError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
    try:
        await asyncio.wait_for(asyncio.shield(link.ready), timeouts.handshake)
    except TimeoutError as e:
        link.close()
        raise MeshTimeoutError(f"handshake with {host}:{port} timed out after {timeouts.handshake} s") from e
    except HandshakeError as e:
        link.close()
        raise type(e)(f"{host}:{port}: {e}") from e
    return link


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port), with a clear error."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), ""
    host = host.strip("[]")
    if not port and default_port is not None:
        return host, default_port
    try:
        value = int(port)
        if not 0 < value < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)") from None
    return host or "127.0.0.1", value


def broadcast(links, message: dict[str, Any]) -> None:
    """Send one message to several links: packed once, sealed per link (each link has its own keys)."""
    links = list(links)
    if links:
        body = encode_body(message, links[0].conn.max_frame)
        for link in links:
            link.write_frame(link.conn.frame(body))
