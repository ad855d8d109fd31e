"""`meshllm status`: what is on the LAN. Browse, then measure each device's link round trip."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from ..cluster.plan import human_bytes
from ..errors import MeshError
from ..net.link import Timeouts, connect, parse_address
from ..wire.frames import PROTOCOL_VERSION
from .mdns import Browser
from .records import PeerRecord, elect, mesh_id

PINGS = 3


async def tcp_rtt(address: str, timeout: float) -> float:
    """Median time to open a TCP connection (one round trip), seconds."""
    host, port = parse_address(address)
    runs = []
    for _ in range(PINGS):
        t0 = time.perf_counter()
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        runs.append(time.perf_counter() - t0)
        writer.close()
    return statistics.median(runs)


async def link_rtt(address: str, secret: bytes, timeout: float, node_id: str | None = None) -> float:
    """Median ping/pong round trip over an authenticated link, seconds."""
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future] = {}

    def on_message(link, msg):
        fut = waiting.get(msg.get("nonce")) if msg["t"] == "pong" else None
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    link = await connect(host, port, secret, node_id or f"status-{os.getpid()}", timeouts=Timeouts(connect=timeout,
                         handshake=timeout), on_message=on_message)
    try:
        runs = []
        for nonce in range(PINGS):
            waiting[nonce] = loop.create_future()
            t0 = time.perf_counter()
            link.send({"t": "ping", "nonce": nonce})
            runs.append(await asyncio.wait_for(waiting[nonce], timeout) - t0)
        return statistics.median(runs)
    finally:
        link.close()


async def survey(secret: bytes | None, interface: str | None, listen_s: float, timeout: float = 2.0) -> dict:
    """Browse for listen_s seconds; classify by mesh; time round trips. A JSON-ready dict."""
    ours = await asyncio.to_thread(mesh_id, secret) if secret else None
    async with Browser(interface) as browser:
        await asyncio.sleep(listen_s)
        records = list(browser.peers.values())
        rejected = dict(browser.rejected)

    def group(r: PeerRecord) -> str:
        if r.version != PROTOCOL_VERSION:
            return f"protocol v{r.version} (we speak v{PROTOCOL_VERSION}): not used"
        if ours is None:
            return r.mesh
        return "ours" if r.mesh == ours else "another mesh"

    async def rtt(r: PeerRecord) -> dict:
        try:
            if ours is not None and r.mesh == ours and r.version == PROTOCOL_VERSION:
                return {"rtt_s": await link_rtt(r.address, secret, timeout), "rtt_kind": "authenticated ping"}
            return {"rtt_s": await tcp_rtt(r.address, timeout), "rtt_kind": "tcp connect"}
        except (MeshError, OSError, TimeoutError) as e:
            return {"rtt_s": None, "rtt_error": str(e) or type(e).__name__}

    rtts = await asyncio.gather(*(rtt(r) for r in records))
    hubs = {}
    for mesh in {r.mesh for r in records}:
        hub = elect([r for r in records if r.mesh == mesh and r.version == PROTOCOL_VERSION])
        if hub is not None:
            hubs[mesh] = hub.node_id
    devices = []
    for r, t in sorted(zip(records, rtts), key=lambda x: (group(x[0]) != "ours", x[0].mesh, -x[0].score)):
        devices.append({**r.to_dict(), "group": group(r),
                        "would_be_hub": hubs.get(r.mesh) == r.node_id, **t})
    return {"mesh_id": ours, "devices": devices, "ignored_records": rejected}


def print_survey(out: dict) -> None:
    devices = out["devices"]
    if not devices:
        print("no meshllm devices found" + (" (is `python -m meshllm join` running on the LAN?)"))
    else:
        print(f"{'device':<20}{'address':<22}{'mesh':<18}{'score':>7}{'cores':>6}{'memory':>11}{'disk':>11}"
              f"{'budget':>11}{'rtt ms':>8}  hub")
        for d in devices:
            rtt = f"{d['rtt_s'] * 1e3:.2f}" if d.get("rtt_s") is not None else "-"
            budget = human_bytes(d["budget_bytes"]) if d["budget_bytes"] else "-"
            print(f"{d['node_id'][:19]:<20}{d['address']:<22}{d['group'][:17]:<18}{d['score']:>7.1f}{d['cores']:>6}"
                  f"{human_bytes(d['memory_bytes']):>11}{human_bytes(d['disk_bytes']):>11}{budget:>11}{rtt:>8}"
                  f"  {'*' if d['would_be_hub'] else ''}")
    for name, why in out["ignored_records"].items():
        print(f"ignored {name}: {why}")
