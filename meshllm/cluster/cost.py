"""The cost model and the planner: which plan decodes fastest here. Pure functions of measurements.

A token's time on a plan of stages (tensor parallelism is one stage of several devices, a pipeline several stages
of one, a hybrid several stages of several; a single device is one stage of one):

    origin_s + sum over stages of [ hop + max(compute + 2 L_s rounds, disk) ]

- hop: the originator sends the hidden state to the stage's devices and its hub sends the result back (the
  originator relays between stages): half the slowest member's round trip to the originator plus half the hub's,
  plus the software time of a step message in and a result out (HOP_S).
- compute: L_s layers, each the slowest member's (weight bytes of its share of the layer / its decode bandwidth +
  2 x its fixed time per phase: the per-op dispatch that a small layer's matmuls do not hide). Members that run
  on one machine share it: their bytes add up at one device's rate, and their fixed time grows when their
  threads outnumber its cores.
- rounds (stages of more than one device): two star allreduces per layer, each the slowest worker's round trip
  to the hub plus the software time of a round and of its phase's compute job (ROUND_S, JOB_S).
- disk: a device whose budget is below its share streams the rest of it from storage every token, at its read
  rate, overlapped with compute (the window prefetches).

The planner enumerates single devices, tensor parallelism over the k strongest, pipelines over them and hybrids
(the k strongest partitioned into groups), drops those a budget rules out (not even one block fits), and picks the
lowest prediction. A kind the user forces runs on every device (the best one alone for 'single').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ..errors import PlanError
from ..model.config import ModelConfig
from .plan import DeviceSpec, Plan, Sizes, block_bytes, staged_plan

# software time of one star allreduce round beyond the wire: scripts/bench_mesh.py, N=2 on loopback, 2-8 KB: star
# p50 minus the TCP ping-pong, 240-305 us; in whole steps on the testbed (scripts/bench_plan.py, tensor-parallel
# pairs) a round cost ~0.7 ms over the link's round trip, of which JOB_S is the phase's executor hop
ROUND_S = 500e-6
JOB_S = 200e-6  # a phase run as its own compute job (a member of a group): loop -> compute thread -> loop
# a step message in and its result out at one stage (framing, sealing): a one-device mesh's step round trip minus
# the device's compute (SmolLM2, loopback: 0.2-0.5 ms)
HOP_S = 400e-6
# a phase's fixed cost (tens of small ops, each a Python dispatch) when a device did not measure its own
PHASE_S = 200e-6
READ_RATE = 400e6  # bytes/s of storage for streamed blocks when a device did not measure its own
KINDS = ("single", "tp", "pipeline", "hybrid")
MAX_PARTITION_DEVICES = 8  # hybrids are enumerated over every partition of at most this many devices


@dataclass(frozen=True)
class DeviceCost:
    """What the model needs of a device: its decode bandwidth (bytes/s of weights a GEMV streams), fixed time per
    phase, budget and storage read rate."""

    name: str
    bandwidth: float
    budget: int | None = None
    phase_s: float = PHASE_S
    read_rate: float = READ_RATE
    flops: float | None = None  # matmul FLOP/s, for the prefill's prediction
    host: str | None = None  # devices of one machine (several `join`s on one box) share its cores and memory
    threads: int = 1
    cores: int = 1


@dataclass(frozen=True)
class Network:
    """Measured round trips in seconds: originator to device i, and device i to device j over a link i opens (a
    worker opens its link to the hub: a relay or a one-way shaper in front of a device only slows links made to
    it)."""

    origin: tuple[float, ...]
    pairs: tuple[tuple[float, ...], ...]

    @classmethod
    def uniform(cls, n: int, rtt: float) -> "Network":
        return cls((rtt,) * n, tuple(tuple(0.0 if i == j else rtt for j in range(n)) for i in range(n)))


@dataclass(frozen=True)
class Prediction:
    """Decode seconds per token and what makes them up; TTFT for `prompt` tokens when every device has flops."""

    token_s: float
    compute_s: float
    rounds_s: float
    hops_s: float
    disk_s: float
    ttft_s: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v * 1e3, 3) if v is not None else None) for k, v in
                (("token_ms", self.token_s), ("compute_ms", self.compute_s), ("rounds_ms", self.rounds_s),
                 ("hops_ms", self.hops_s), ("disk_ms", self.disk_s), ("ttft_ms", self.ttft_s))}


@dataclass(frozen=True)
class Candidate:
    """A plan over devices given by index into the planner's list, with its prediction (or why it was dropped)."""

    kind: str
    stages: tuple[tuple[int, ...], ...]
    plan: Plan | None
    prediction: Prediction | None
    refused: str | None = None
    names: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        if self.plan is not None:
            return self.plan.describe()
        return f"{self.kind}: " + " -> ".join("+".join(self.names[i] for i in st) for st in self.stages)


def predict(config: ModelConfig, plan: Plan, costs: Sequence[DeviceCost], net: Network,
            index: Sequence[int], *, origin_s: float = 0.0, prompt: int = 0) -> Prediction:
    """Predicted decode time per token of `plan`, whose rank r runs on device `index[r]` of `costs`/`net`."""
    z = plan.sizes
    compute = rounds = hops = disk = 0.0
    prefill = 0.0 if prompt and all(costs[i].flops for i in index) else None
    for ranks, hub in plan.groups:
        layers = len(plan.shards[ranks[0]].layers(config))
        per_layer, stage_disk, per_layer_prefill = 0.0, 0.0, 0.0
        for same in _by_host(ranks, [costs[index[r]] for r in ranks]):
            # members on one machine share its memory bus (their bytes add up at one device's rate) and its cores
            cs = [costs[index[r]] for r in same]
            busy = max(1.0, sum(c.threads for c in cs) / max(1, min(c.cores for c in cs)))
            read = sum(sum(block_bytes(config, plan.shards[r], z)) for r in same)
            per_layer = max(per_layer, read / min(c.bandwidth for c in cs) + 2 * max(c.phase_s for c in cs) * busy)
        for r in ranks:
            c = costs[index[r]]
            a, m = block_bytes(config, plan.shards[r], z)
            held = plan.shard_bytes[r] if plan.shard_bytes else layers * (a + m)
            if c.budget is not None and c.budget < held:
                stage_disk = max(stage_disk, (held - c.budget) / c.read_rate)
            if prefill is not None:  # 2 FLOPs a weight a token
                per_layer_prefill = max(per_layer_prefill, 2 * layer_weights(config, plan.shards[r]) * prompt
                                        / c.flops + 2 * c.phase_s)
        wire = 0.0
        if len(ranks) > 1:
            far = max(net.pairs[index[r]][index[hub]] for r in ranks if r != hub)
            wire = 2 * layers * (far + ROUND_S + JOB_S)
        hop = (max(net.origin[index[r]] for r in ranks) + net.origin[index[hub]]) / 2 + HOP_S
        stage = max(layers * per_layer + wire, stage_disk)
        compute += layers * per_layer
        rounds += wire
        hops += hop
        disk += max(0.0, stage - layers * per_layer - wire)
        if prefill is not None:
            prefill += layers * per_layer_prefill + wire + hop
    token = origin_s + compute + rounds + hops + disk
    return Prediction(token, compute, rounds, hops, disk, None if prefill is None else prefill + origin_s)


def _by_host(ranks: Sequence[int], cs: Sequence[DeviceCost]) -> list[list[int]]:
    """The ranks grouped by the machine they run on (a device that did not say is a machine of its own)."""
    groups: dict = {}
    for r, c in zip(ranks, cs):
        groups.setdefault(c.host if c.host is not None else ("device", r), []).append(r)
    return list(groups.values())


def layer_weights(config: ModelConfig, shard) -> int:
    """Weights of one layer of a shard (its q/k/v/o rows and columns, its MLP columns)."""
    d, hd = config.hidden_size, config.head_dim
    kv0, kv1 = shard.kv_range(config)
    return (2 * shard.num_q + 2 * (kv1 - kv0)) * hd * d + 3 * shard.num_mlp * d


def _partitions(items: Sequence[int]) -> Iterator[list[list[int]]]:
    """Every partition of `items` into non-empty groups (groups keep the items' order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def candidates(config: ModelConfig, sizes: "str | Sizes", costs: Sequence[DeviceCost], net: Network, *,
               kinds: Sequence[str] = KINDS, origin_s: float = 0.0, every: bool = False) -> list[Candidate]:
    """Every candidate plan with its prediction, fastest first; the ones a budget or the model's shape rules out
    come last with the reason. `every`: plans of several devices use all of them (a kind the user forced), not
    only the k strongest."""
    z = Sizes.of(sizes)
    n = len(costs)
    names = tuple(c.name for c in costs)
    order = sorted(range(n), key=lambda i: (-costs[i].bandwidth, names[i], i))  # strongest first
    specs = [DeviceSpec(c.name, c.bandwidth / 1e9, c.budget) for c in costs]
    seen: set = set()
    out: list[Candidate] = []

    def add(kind: str, stages: list[list[int]]) -> None:
        key = (kind, tuple(tuple(st) for st in stages))
        if key in seen:
            return
        seen.add(key)
        try:
            plan = staged_plan(config, specs, z, stages)
        except PlanError as e:
            out.append(Candidate(kind, key[1], None, None, str(e), names))
            return
        index = [i for st in stages for i in st]
        out.append(Candidate(kind, key[1], plan, predict(config, plan, costs, net, index, origin_s=origin_s),
                             None, names))

    if "single" in kinds:
        for i in order:
            add("single", [[i]])
    for k in range(n if every else 2, n + 1):
        top = order[:k]
        if "tp" in kinds:
            add("tp", [top])
        if "pipeline" in kinds and k <= config.num_layers:
            add("pipeline", [[i] for i in top])
        if "hybrid" in kinds and k >= 3 and k <= MAX_PARTITION_DEVICES:
            for part in _partitions(top):
                if 1 < len(part) < k and len(part) <= config.num_layers:
                    # groups in order of strength (each group's strongest first), so equal layouts compare equal
                    add("hybrid", sorted(part, key=lambda g: order.index(g[0])))
    out.sort(key=lambda c: (c.prediction is None, c.prediction.token_s if c.prediction else math.inf,
                            KINDS.index(c.kind), c.stages))
    return out


def choose(config: ModelConfig, sizes: "str | Sizes", costs: Sequence[DeviceCost], net: Network, *,
           kind: str = "auto", origin_s: float = 0.0) -> tuple[Candidate, list[Candidate]]:
    """The fastest candidate (of `kind`, or of any kind for 'auto') and every candidate considered. Raises
    PlanError naming what would work when no candidate of that kind fits."""
    if kind != "auto" and kind not in KINDS:
        raise PlanError(f"unknown plan kind {kind!r}: use auto, {', '.join(KINDS)}")
    n = len(costs)
    if n == 0:
        raise PlanError("no devices to plan over")
    need = {"tp": 2, "pipeline": 2, "hybrid": 3}.get(kind, 1)
    if n < need:
        raise PlanError(f"a {kind} plan needs at least {need} devices, and {n} answered: add devices or use "
                        f"--plan auto")
    # a forced kind of several devices runs on all of them; auto also weighs leaving the weakest out
    cands = candidates(config, sizes, costs, net, kinds=KINDS if kind == "auto" else (kind,), origin_s=origin_s,
                       every=kind != "auto")
    ok = [c for c in cands if c.plan is not None]
    if not ok:
        raise PlanError(f"no {'' if kind == 'auto' else kind + ' '}plan fits these devices: " + "; ".join(
            f"{c.label}: {c.refused}" for c in cands[:4]))
    return ok[0], cands


PARTS = (("compute_s", "compute"), ("rounds_s", "allreduce rounds"), ("hops_s", "hops to and from the originator"),
         ("disk_s", "reads from storage"))


def explain(chosen: Candidate, cands: Sequence[Candidate]) -> list[str]:
    """Why the winner won: against the best candidate of every other kind, what that one pays more of."""
    lines, seen = [], {chosen.kind}
    w = chosen.prediction
    for c in cands:
        if c.plan is None or c.kind in seen:
            continue
        seen.add(c.kind)
        p = c.prediction
        worst = max(PARTS, key=lambda part: getattr(p, part[0]) - getattr(w, part[0]))
        more = getattr(p, worst[0]) - getattr(w, worst[0])
        lines.append(f"{c.kind} ({c.label}): {p.token_s * 1e3:.1f} ms/token, +{(p.token_s - w.token_s) * 1e3:.1f} "
                     f"ms; most of it {worst[1]} (+{more * 1e3:.1f} ms)")
    return lines
