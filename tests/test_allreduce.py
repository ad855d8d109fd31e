"""The star allreduce driver over real loopback sockets: exact fp32 rank-order sums, errors on bad rounds."""

from __future__ import annotations

import asyncio

import pytest
import torch

from meshllm.collectives.group import StarGroup
from meshllm.errors import MeshTimeoutError
from meshllm.net.link import Timeouts
from meshllm.runtime.tensors import to_record

SECRET = b"star-test-secret"


async def make_group(world: int, timeouts: Timeouts = Timeouts()) -> list[StarGroup]:
    hub = await StarGroup(0, world, SECRET, timeouts=timeouts).__aenter__()
    members = [hub] + [await StarGroup(r, world, SECRET, port=hub.port, timeouts=timeouts).__aenter__()
                       for r in range(1, world)]
    await asyncio.gather(*(m.start(10) for m in members))
    return members


async def close(members) -> None:
    for m in members:
        await m.__aexit__(None, None, None)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_every_member_gets_the_fp32_rank_order_sum(world, dtype):
    members = await make_group(world)
    try:
        g = torch.Generator().manual_seed(world)
        for rnd in range(20):
            parts = [torch.randn(1, 3, 40, generator=g).to(dtype) for _ in range(world)]
            expected = parts[0].float()
            for p in parts[1:]:
                expected = expected + p.float()
            expected = expected.to(dtype)
            key = (1, rnd, 0, 0)
            results = await asyncio.gather(*(m(key, p) for m, p in zip(members, parts)))
            for r in results:
                assert r.dtype == dtype
                assert torch.equal(r, expected)  # identical bits on every member
    finally:
        await close(members)


async def test_a_duplicate_part_closes_that_workers_link():
    members = await make_group(3)
    try:
        hub, w1, w2 = members
        rogue = w1.reduce.hub_link
        part = to_record(torch.ones(1, 1, 4))
        msg = {"t": "part", "req": 1, "step": 1, "layer": 0, "phase": 0, "rank": 1, "x": part}
        rogue.send(msg)
        rogue.send(msg)
        await asyncio.wait_for(rogue.closed, 5)
        assert "duplicate part from rank 1" in str(rogue.error)
    finally:
        await close(members)


async def test_a_part_claiming_another_rank_is_refused():
    members = await make_group(3)
    try:
        rogue = members[1].reduce.hub_link
        rogue.send({"t": "part", "req": 1, "step": 1, "layer": 0, "phase": 0, "rank": 2,
                    "x": to_record(torch.ones(1, 1, 4))})
        await asyncio.wait_for(rogue.closed, 5)
        assert "claims rank 2" in str(rogue.error)
    finally:
        await close(members)


async def test_a_missing_part_times_out_naming_the_rank():
    members = await make_group(3, Timeouts(allreduce=0.3))
    try:
        hub, w1, _ = members
        t = torch.ones(1, 1, 4)
        with pytest.raises(MeshTimeoutError, match=r"waiting for rank\(s\) \[2\]"):
            await asyncio.gather(hub((1, 1, 0, 0), t), w1((1, 1, 0, 0), t))
    finally:
        await close(members)
