"""A LAN on one machine: N network namespaces on a Linux bridge, a `meshllm join` in each (root only).

    sudo python scripts/lan_testbed.py --devices 4 [--rtt-ms 1] [--rate 100mbit] [--cpus 0.5] [--memory 1GiB]
                                       [--secret S] [--model-budget 64MiB]

Builds a bridge with an address of its own on this side (the originator's), N namespaces each with a veth on the
bridge and an address of their own (10.213.K.i/24, K from the process id), optionally caps each link's bandwidth
(tbf, both ways), each device's CPU and memory (cgroup v1), and adds link latency with a userspace relay in each
namespace (this kernel has no netem). Prints one JSON line with the layout when every device is ready, then holds
until stdin closes, SIGINT or SIGTERM; everything it made is removed on the way out. Only loopback and the
namespaces it created are ever addressed. As a library: `async with Testbed(...) as tb:`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cgroups import Cap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
READY = "meshllm-device ready"
DEVICE_PORT = 7340
RELAY_PORT = 7341


def unusable() -> str | None:
    """Why the testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, cgroups)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"mlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def free_subnet(start: int) -> str:
    """A 10.213.K.0/24 no interface or route here uses already (K tried from `start`)."""
    taken = sh("ip", "-4", "-o", "addr", "show").stdout + sh("ip", "-4", "route", "show").stdout
    for k in range(250):
        net = f"10.213.{(start + k) % 250}"
        if f"{net}." not in taken:
            return net
    raise RuntimeError("no free 10.213.K.0/24 subnet for the testbed")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Testbed:
    """N namespaces on a bridge, `join` running in each."""

    __test__ = False  # not a pytest class

    def __init__(self, devices: int, secret: str, *, rtt_ms: float | list[float] = 0.0, rate: str | None = None,
                 cpus: float | None = None, memory: int | None = None, budget: int | None = None,
                 scores: list[float] | None = None, log_dir: Path | None = None, threads: int = 1,
                 start: bool = True) -> None:
        if not 1 <= devices <= 200:
            raise ValueError("--devices must be 1..200")
        self.n, self.secret, self.rtt_ms, self.rate = devices, secret, rtt_ms, rate
        self.cpus, self.memory, self.budget, self.scores, self.threads = cpus, memory, budget, scores, threads
        self.start_devices = start
        tag = os.getpid() % 100000
        self.subnet = free_subnet(os.getpid() % 250)
        self.bridge = f"mlb{tag}"
        self.host_ip = f"{self.subnet}.254"
        self.namespaces = [f"mlns{tag}-{i}" for i in range(devices)]
        self.veths = [f"mlv{tag}-{i}" for i in range(devices)]
        self.ips = [f"{self.subnet}.{i + 1}" for i in range(devices)]
        self.log_dir = Path(log_dir) if log_dir else Path(f"/tmp/meshllm-testbed-{tag}")
        self.procs: list[asyncio.subprocess.Process] = []
        self.caps: list[Cap] = []
        self.devices: list[dict] = []
        self.started_at: list[float] = []  # perf_counter when each join was started
        self._made_bridge = False
        self._made_ns: list[str] = []
        self._caps_made: list[Cap] = []

    # -- network -----------------------------------------------------------------------------------------------

    def build(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for ns, veth, ip in zip(self.namespaces, self.veths, self.ips):
            sh("ip", "netns", "add", ns)
            self._made_ns.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rate:  # both directions: the bridge side shapes what the device receives
                tbf = ["root", "tbf", "rate", self.rate, "burst", "64kb", "latency", "50ms"]
                sh("tc", "qdisc", "add", "dev", veth, *tbf)
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", *tbf)

    def teardown(self) -> None:
        for veth in self.veths:  # the pair goes now (a namespace's own cleanup is asynchronous)
            sh("ip", "link", "del", veth, check=False)
        for ns in self._made_ns:
            sh("ip", "netns", "del", ns, check=False)
        self._made_ns = []
        if self._made_bridge:
            sh("ip", "link", "del", self.bridge, check=False)
            self._made_bridge = False

    def leftovers(self) -> list[str]:
        """Anything of ours still there (for the clean-teardown check)."""
        links = {line.split()[0].split("@")[0] for line in sh("ip", "-br", "link").stdout.splitlines() if line}
        ns = {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line}
        out = [x for x in [self.bridge, *self.veths] if x in links]
        out += [x for x in self.namespaces if x in ns]
        out += [c.name for c in [*self.caps, *self._caps_made] if any(g.exists() for g in c.groups)]
        return out

    # -- devices -----------------------------------------------------------------------------------------------

    def _exec(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    async def start(self) -> None:
        env = {**os.environ, "MESHLLM_SECRET": self.secret, "PYTHONPATH": str(ROOT)}
        waits = []
        for i in range(self.n):
            prefix: list[str] = []
            if self.cpus or self.memory:
                cap = Cap(f"tb{i}", memory_bytes=self.memory, cpus=self.cpus).__enter__()
                self.caps.append(cap)
                prefix = cap.prefix()
            ip = self.ips[i]
            # the cgroup first: `ip netns exec` mounts a /sys of its own, without the cgroup file systems
            cmd = [*prefix, *self._exec(i), sys.executable, "-m", "meshllm", "join", "--interface", ip,
                   "--port", str(DEVICE_PORT), "--name", f"ns{i}", "--threads", str(self.threads),
                   "--cache-dir", str(self.log_dir / f"cache-{i}")]
            if self.scores:
                cmd += ["--score", str(self.scores[i % len(self.scores)])]
            if self.budget:
                cmd += ["--memory-budget", str(self.budget)]
            rtt = self.rtt_ms[i] if isinstance(self.rtt_ms, list) else self.rtt_ms  # one per device, or for all
            if rtt:
                relay = await asyncio.create_subprocess_exec(
                    *self._exec(i), sys.executable, str(Path(__file__).parent / "relay.py"), "--listen",
                    f"{ip}:{RELAY_PORT}", "--to", f"{ip}:{DEVICE_PORT}", "--rtt-ms", str(rtt),
                    stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
                self.procs.append(relay)
                line = (await asyncio.wait_for(relay.stdout.readline(), 30)).decode()
                if not line.startswith("relay ready"):
                    raise RuntimeError(f"relay in {self.namespaces[i]} did not start: {line!r}")
                cmd += ["--advertise-port", str(RELAY_PORT)]
            log = open(self.log_dir / f"ns{i}.log", "wb")
            self.started_at.append(time.perf_counter())
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=log,
                                                        stdin=asyncio.subprocess.DEVNULL, env=env)
            log.close()
            self.procs.append(proc)
            waits.append(self._ready(proc, i))
        self.devices = list(await asyncio.wait_for(asyncio.gather(*waits), 120))

    async def _ready(self, proc: asyncio.subprocess.Process, i: int) -> dict:
        line = (await proc.stdout.readline()).decode()
        if not line.startswith(READY):
            raise RuntimeError(f"device in {self.namespaces[i]} did not start: {line!r}; see "
                               f"{self.log_dir / f'ns{i}.log'}")
        return {"name": line.split()[2], "address": line.split()[3], "namespace": self.namespaces[i], "ip": self.ips[i],
                "ready_s": time.perf_counter() - self.started_at[i]}

    async def stop_devices(self, timeout: float = 15.0) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                p.kill()
                await p.wait()
        self.procs = []
        caps, self.caps = self.caps, []
        for cap in caps:
            await asyncio.to_thread(cap.__exit__, None, None, None)
        self._caps_made = caps

    async def __aenter__(self) -> "Testbed":
        try:
            building = asyncio.ensure_future(asyncio.to_thread(self.build))
            try:
                await asyncio.shield(building)
            except asyncio.CancelledError:
                await asyncio.wait({building}, timeout=60)  # let the thread finish, so teardown sees all it made
                raise
            if self.start_devices:
                await self.start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.stop_devices()
        finally:
            await asyncio.to_thread(self.teardown)

    def layout(self) -> dict:
        return {"bridge": self.bridge, "host_ip": self.host_ip, "devices": self.devices, "rtt_ms": self.rtt_ms,
                "rate": self.rate, "log_dir": str(self.log_dir)}


def _size(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from meshllm.cli import parse_size

    return parse_size(text)


async def main_async(args) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from the start: a signal while building still tears down
        loop.add_signal_handler(sig, main.cancel)
    try:
        await _serve(args)
    except asyncio.CancelledError:
        pass
    print("testbed removed", file=sys.stderr)


async def _serve(args) -> None:
    secret = args.secret or os.environ.get("MESHLLM_SECRET") or os.urandom(16).hex()
    async with Testbed(args.devices, secret, rtt_ms=args.rtt_ms, rate=args.rate, cpus=args.cpus,
                       memory=args.memory, budget=args.model_budget, threads=args.threads) as tb:
        print(json.dumps({**tb.layout(), "secret_env": "MESHLLM_SECRET" if not args.secret else None}),
              flush=True)
        print(f"ready: MESHLLM_SECRET={secret} python -m meshllm generate --interface {tb.host_ip} "
              f"--min-devices {args.devices} --prompt ...   (stop with Ctrl-C or by closing stdin)", file=sys.stderr)
        closed = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 65536):
                loop.remove_reader(sys.stdin.fileno())
                closed.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        await closed.wait()  # or a signal cancels this task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--secret", help="mesh secret (default: $MESHLLM_SECRET, else a random one)")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added to every link (relay)")
    ap.add_argument("--rate", help="bandwidth cap per link, tc syntax (e.g. 100mbit)")
    ap.add_argument("--cpus", type=float, help="CPU cap per device, in cores (cgroup v1 cfs quota)")
    ap.add_argument("--memory", type=_size, help="memory cap per device (cgroup v1), e.g. 1GiB")
    ap.add_argument("--model-budget", type=_size, help="--memory-budget for each device's weights")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per device (default 1)")
    args = ap.parse_args()
    reason = unusable()
    if reason:
        sys.exit(f"lan_testbed: {reason}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
