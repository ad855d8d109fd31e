"""LocalCluster: N device processes on 127.0.0.1, started together and stopped together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from ..errors import MeshError
from .executors import cpu_count

log = logging.getLogger("meshllm.launcher")

READY = "meshllm-device ready"


class LocalCluster:
    """`async with LocalCluster(3, secret) as addresses:` runs `python -m meshllm join` three times."""

    def __init__(self, n: int, secret: bytes, *, threads: int | None = None, pin: bool = False,
                 start_timeout: float = 60.0, stop_timeout: float = 5.0, verbose: bool = False,
                 log_dir: str | os.PathLike | None = None, cpus: list[int] | None = None,
                 memory_budget: int | None = None, read_rate: int | None = None,
                 cache_dir: str | os.PathLike | None = None, prefixes: list[list[str]] | None = None) -> None:
        if n < 1:
            raise MeshError(f"--local-devices must be at least 1, got {n}")
        self.n = n
        self.secret = secret
        self.threads = threads
        self.pin = pin
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.verbose = verbose
        self.cpus = cpus  # with pin: device i runs on cpus[i % len(cpus)] (default: the cores we may use)
        self.memory_budget, self.read_rate, self.cache_dir = memory_budget, read_rate, cache_dir
        self.prefixes = prefixes  # device i's command runs under prefixes[i] (e.g. a shell entering a cgroup)
        self.log_dir = log_dir  # each device's stderr goes to log_dir/local-i.log instead of ours
        self.log_files: list = []
        self.procs: list[asyncio.subprocess.Process] = []
        self.addresses: list[str] = []

    async def __aenter__(self) -> list[str]:
        env = {**os.environ, "MESHLLM_SECRET": self.secret.decode()}  # not on the command line: ps shows argv
        cores = self.cpus or (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else list(range(cpu_count())))
        # N devices on one machine share its cores: by default each gets its share of threads, not all of them
        threads = self.threads or max(1, len(cores) // self.n)
        try:
            for i in range(self.n):
                cmd = [sys.executable, "-m", "meshllm", "join", "--host", "127.0.0.1", "--port", "0",
                       "--name", f"local-{i}", "--no-advertise", "--score", "1"]  # private to this run
                if self.pin:
                    cmd += ["--cpus", str(cores[i % len(cores)])]
                cmd += ["--threads", str(threads)]
                if self.memory_budget:
                    cmd += ["--memory-budget", str(self.memory_budget)]
                if self.read_rate:
                    cmd += ["--read-rate", str(self.read_rate)]
                if self.cache_dir:
                    cmd += ["--cache-dir", str(self.cache_dir)]
                cmd += ["--verbose"] if self.verbose else ["--quiet"]
                if self.prefixes:
                    cmd = [*self.prefixes[i % len(self.prefixes)], *cmd]
                stderr = None
                if self.log_dir is not None:
                    stderr = open(os.path.join(self.log_dir, f"local-{i}.log"), "wb")
                    self.log_files.append(stderr)
                self.procs.append(await asyncio.create_subprocess_exec(
                    *cmd, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, stderr=stderr, env=env))
            self.addresses = list(await asyncio.wait_for(
                asyncio.gather(*(self._ready(p, i) for i, p in enumerate(self.procs))), self.start_timeout))
        except BaseException:
            await self._stop()
            raise
        log.info("started %d local devices: %s", self.n, ", ".join(self.addresses))
        return self.addresses

    async def _ready(self, proc: asyncio.subprocess.Process, i: int) -> str:
        while True:
            line = await proc.stdout.readline()
            if not line:
                code = await proc.wait()
                raise MeshError(f"local device {i} exited with code {code} before it was ready")
            text = line.decode(errors="replace").strip()
            if text.startswith(READY):
                return text.rsplit(" ", 1)[-1]

    async def __aexit__(self, *exc) -> None:
        await self._stop()

    async def _stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("local device pid %d did not stop in %.0f s; killing it", p.pid, self.stop_timeout)
                p.kill()
                await p.wait()
        self.procs = []
        for f in self.log_files:
            f.close()
        self.log_files = []
