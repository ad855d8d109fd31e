"""Real `python -m meshllm join` processes advertising on loopback, for discovery tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from meshllm.runtime.launcher import READY

LOOPBACK = "127.0.0.1"


class Joined:
    """One `join` process; `stop()` sends SIGTERM (clean leave), `kill()` SIGKILL (no goodbye)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, address: str, log: Path) -> None:
        self.proc, self.name, self.address, self.log = proc, name, address, log

    async def stop(self, timeout: float = 15.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)


async def join(name: str, secret: str, tmp: Path, *, score: float | None = None, extra: tuple[str, ...] = (),
               timeout: float = 60.0, port: int | None = 0) -> Joined:
    """Start `meshllm join` on loopback (advertised by mDNS on 127.0.0.1) and wait for READY. `port`: 0 for any
    free port, None to give no --port (the default port when free)."""
    cmd = [sys.executable, "-m", "meshllm", "join", "--interface", LOOPBACK, "--name", name, "--threads", "1",
           "--cache-dir", str(tmp / f"cache-{name}"), "--verbose", *extra]
    if port is not None:
        cmd += ["--port", str(port)]
    if score is not None:
        cmd += ["--score", str(score)]
    log = tmp / f"{name}.log"
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, stderr=open(log, "wb"),
        env={**os.environ, "MESHLLM_SECRET": secret})
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert line.startswith(READY), f"{line!r}\n{log.read_text()}"
    return Joined(proc, name, line.split()[-1], log)


async def join_all(specs: list[tuple[str, str, float | None]], tmp: Path) -> list[Joined]:
    """Start several (name, secret, score) devices at once."""
    return list(await asyncio.gather(*(join(n, s, tmp, score=sc) for n, s, sc in specs)))


def pid_listening_on(address: str) -> int:
    """The pid of the process listening on HOST:PORT (ss)."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
