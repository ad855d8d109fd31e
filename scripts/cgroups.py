"""cgroup v1 caps for benchmark and testbed processes: a memory limit (page cache included, so what does not fit
is really read again from disk) and a CPU quota. Root only; every group this creates is removed on exit."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def unusable(controller: str = "memory") -> str | None:
    """Why a cgroup v1 controller cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    probe = "memory.limit_in_bytes" if controller == "memory" else "cpu.cfs_quota_us"
    if not (ROOT / controller / probe).exists():
        return f"cgroup v1 {controller} controller not mounted at {ROOT / controller}"
    return None


class Cap:
    """One group under each controller used; `prefix` runs a command inside it. Use as a context manager."""

    def __init__(self, name: str, *, memory_bytes: int | None = None, cpus: float | None = None) -> None:
        self.name = f"meshllm-{os.getpid()}-{name}"
        self.memory_bytes, self.cpus = memory_bytes, cpus
        self.groups: list[Path] = []

    def __enter__(self) -> "Cap":
        try:
            self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _make(self) -> None:
        if self.memory_bytes is not None:
            g = ROOT / "memory" / self.name
            g.mkdir()
            self.groups.append(g)
            (g / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
            if (g / "memory.swappiness").exists():
                (g / "memory.swappiness").write_text("0")
        if self.cpus is not None:
            g = ROOT / "cpu" / self.name
            g.mkdir()
            self.groups.append(g)
            period = 100_000
            (g / "cpu.cfs_period_us").write_text(str(period))
            (g / "cpu.cfs_quota_us").write_text(str(max(1000, int(self.cpus * period))))

    def prefix(self) -> list[str]:
        """argv prefix: a shell that moves itself into the groups, then execs the command."""
        moves = " && ".join(f"echo $$ > {g}/cgroup.procs" for g in self.groups) or "true"
        return ["sh", "-c", f'{moves} && exec "$@"', "sh"]

    def max_usage(self) -> int | None:
        for g in self.groups:
            if (g / "memory.max_usage_in_bytes").exists():
                return int((g / "memory.max_usage_in_bytes").read_text())
        return None

    def __exit__(self, *exc) -> None:
        for g in self.groups:
            for _ in range(50):  # the processes inside may still be exiting
                try:
                    g.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
