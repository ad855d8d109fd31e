"""mDNS with zeroconf's asyncio API: a device advertises its record; apps and `status` browse for records.

Everything runs on the caller's event loop; every wait has a timeout. A record that does not decode is ignored with
one log line per service name (a device of a newer meshllm, or something that is not meshllm at all).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Callable

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..errors import MeshError
from .records import SERVICE_TYPE, PeerRecord, RecordError, decode

log = logging.getLogger("meshllm.discovery")

RESOLVE_TIMEOUT_MS = 3000
MAX_PEERS = 256  # records kept by a browser; more is a flood, not a LAN of devices


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses (what a device bound to 0.0.0.0 advertises), best first: LAN addresses, then
    link-local, then loopback."""
    import ifaddr

    found = {ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)}
    return sorted(found, key=lambda ip: (ip.startswith("127."), ip.startswith("169.254."), ip)) or ["127.0.0.1"]


def _subnet(ip: str) -> str:
    return ip.rsplit(".", 1)[0]


def order_addresses(addresses, ours: list[str]) -> tuple[str, ...]:
    """A peer's advertised addresses, the one most likely to reach it from here first: on a /24 we are on, then
    not link-local, not loopback (unless it is all there is), then as advertised."""
    nets = {_subnet(a) for a in ours if not a.startswith("127.")}
    return tuple(sorted(dict.fromkeys(addresses), key=lambda a: (
        _subnet(a) not in nets, a.startswith("127.") and bool(nets), a.startswith("169.254."))))


def check_ipv4(address: str, what: str) -> str:
    try:
        socket.inet_aton(address)
    except OSError:
        raise MeshError(f"{what} {address!r} is not an IPv4 address of this machine (one of: "
                        f"{', '.join(local_addresses())})") from None
    return address


def _zeroconf(interface: str | None) -> AsyncZeroconf:
    try:
        if interface:
            return AsyncZeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    except OSError as e:
        raise MeshError(f"cannot start mDNS on {interface or 'all interfaces'}: {e}; pass --interface with one of "
                        f"this machine's addresses ({', '.join(local_addresses())})") from e


class Advertiser:
    """`async with Advertiser(record, interface):` keeps `record` advertised; unregisters (goodbye) on exit."""

    def __init__(self, record: PeerRecord, interface: str | None = None, timeout: float = 5.0) -> None:
        self.record = record
        self.interface = interface
        self.timeout = timeout
        # the instance name carries a random tag, so two devices never collide and no probing round is needed
        self.instance = f"{record.node_id[:40]}-{secrets.token_hex(3)}"
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def __aenter__(self) -> "Advertiser":
        r = self.record
        for a in r.addresses:
            check_ipv4(a, "advertised address")
        self._zc = _zeroconf(self.interface)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, f"{self.instance}.{SERVICE_TYPE}", port=r.port, properties=r.properties(),
            addresses=[socket.inet_aton(a) for a in r.addresses], server=f"{self.instance}.local.")
        try:
            task = await asyncio.wait_for(self._zc.async_register_service(self._info, cooperating_responders=True),
                                          self.timeout)
            await asyncio.wait_for(task, self.timeout)
        except BaseException:
            await self._close()
            raise
        log.info("advertising %s on %s (%s)", self.instance, ", ".join(r.addresses), self.interface or "all")
        return self

    async def __aexit__(self, *exc) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            if self._info is not None:
                task = await asyncio.wait_for(zc.async_unregister_service(self._info), self.timeout)
                await asyncio.wait_for(task, self.timeout)
        except (TimeoutError, KeyError, OSError) as e:
            log.warning("mDNS goodbye not sent: %s", e)
        finally:
            await asyncio.wait_for(zc.async_close(), self.timeout)


class Browser:
    """`async with Browser(interface) as b:` keeps `b.peers` (service name -> PeerRecord) current.

    `await b.changed(timeout)` waits for the next addition, update or removal.
    """

    def __init__(self, interface: str | None = None, on_change: Callable[[], None] | None = None) -> None:
        self.interface = interface
        self.peers: dict[str, PeerRecord] = {}
        self.rejected: dict[str, str] = {}  # service name -> why its record was ignored (at most MAX_PEERS)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: dict[str, asyncio.Task] = {}  # service name -> its lookup under way
        self._ours = [interface] if interface else []
        self._event = asyncio.Event()
        self._on_change = on_change

    async def __aenter__(self) -> "Browser":
        if not self._ours:
            self._ours = await asyncio.to_thread(local_addresses)
        self._zc = _zeroconf(self.interface)
        try:
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._handler])
        except BaseException:
            await asyncio.wait_for(self._zc.async_close(), 5.0)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        try:
            if self._browser is not None:
                await asyncio.wait_for(self._browser.async_cancel(), 5.0)
        finally:
            if self._zc is not None:
                await asyncio.wait_for(self._zc.async_close(), 5.0)

    def _handler(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()  # a lookup finishing after the goodbye must not bring the record back
            self.rejected.pop(name, None)
            if self.peers.pop(name, None) is not None:
                log.info("device left: %s", name)
                self._notify()
            return
        if name in self._tasks:
            return  # already being looked up
        if len(self._tasks) >= MAX_PEERS:
            log.warning("ignoring %s: %d mDNS lookups already under way", name, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks[name] = task
        task.add_done_callback(lambda t, n=name: self._tasks.pop(n, None) if self._tasks.get(n) is t else None)

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("no answer resolving %s", name)
            return
        try:
            addresses = order_addresses(info.parsed_addresses(IPVersion.V4Only), self._ours)
            record = decode(info.properties or {}, addresses, info.port or 0)
            if not record.addresses:
                raise RecordError("no IPv4 address")
        except RecordError as e:
            if self.rejected.get(name) != str(e):
                log.warning("ignoring mDNS record %s: %s", name, e)
            if name in self.rejected or len(self.rejected) < MAX_PEERS:
                self.rejected[name] = str(e)
            return
        if name not in self.peers and len(self.peers) >= MAX_PEERS:
            log.warning("ignoring %s: already tracking %d devices", name, MAX_PEERS)
            return
        self.rejected.pop(name, None)
        if self.peers.get(name) != record:
            self.peers[name] = record
            log.info("device found: %s at %s (score %.1f)", record.node_id, record.address, record.score)
            self._notify()

    def _notify(self) -> None:
        self._event.set()
        if self._on_change is not None:
            self._on_change()

    async def changed(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a change; True if one came."""
        self._event.clear()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def members(self, mesh: str, version: int) -> list[PeerRecord]:
        """Records of our mesh and protocol version, one per node id (the newest wins), sorted by node id."""
        by_id = {r.node_id: r for r in self.peers.values() if r.mesh == mesh and r.version == version}
        return sorted(by_id.values(), key=lambda r: r.node_id)
