"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms, pure.

Label values are the server's own (endpoint names, status codes, device ids), never a client's text, so the
number of series is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
MAX_SERIES = 256  # per metric: labels beyond this are folded into one "other" series


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.total += value
        self.n += 1


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, esc)) + "}"


class Metrics:
    """Named series with HELP and TYPE, rendered in the order they were declared."""

    def __init__(self, prefix: str = "meshllm_") -> None:
        self.prefix = prefix
        self._kinds: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[tuple, float | Histogram]] = {}

    def declare(self, name: str, kind: str, help: str) -> None:
        self._kinds[name] = (kind, help)
        self._values.setdefault(name, {})

    def _series(self, name: str, labels: dict | None):
        key = tuple(sorted((labels or {}).items()))
        series = self._values[name]
        if key not in series and len(series) >= MAX_SERIES:
            key = tuple((k, "other") for k, _ in key)
        return series, key

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        series, key = self._series(name, labels)
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        series, key = self._series(name, labels)
        series[key] = value

    def observe(self, name: str, value: float, buckets: tuple[float, ...], **labels: str) -> None:
        series, key = self._series(name, labels)
        h = series.get(key)
        if h is None:
            h = series[key] = Histogram(buckets)
        h.observe(value)

    def render(self) -> str:
        lines = []
        for name, (kind, help) in self._kinds.items():
            full = self.prefix + name
            lines.append(f"# HELP {full} {help}")
            lines.append(f"# TYPE {full} {kind}")
            for key, value in self._values[name].items():
                if isinstance(value, Histogram):
                    for b, c in zip(value.buckets, value.counts):
                        lines.append(f"{full}_bucket{_labels(key + (('le', repr(float(b))),))} {c}")
                    lines.append(f"{full}_bucket{_labels(key + (('le', '+Inf'),))} {value.n}")
                    lines.append(f"{full}_sum{_labels(key)} {value.total!r}")
                    lines.append(f"{full}_count{_labels(key)} {value.n}")
                else:
                    lines.append(f"{full}{_labels(key)} {float(value)!r}")
        return "\n".join(lines) + "\n"
