"""Zero-config discovery: TXT records, mDNS on loopback with real `join` processes, the Mesh app API."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from helpers.checkpoints import VARIANTS
from helpers.devices import LOOPBACK, join, join_all

from meshllm import Mesh
from meshllm.discovery.mdns import Browser
from meshllm.discovery.records import SERVICE_TYPE, PeerRecord, RecordError, decode, elect, mesh_id
from meshllm.discovery.status import survey
from meshllm.errors import MeshTimeoutError
from meshllm.runtime.local import LocalEngine
from meshllm.wire.frames import PROTOCOL_VERSION

PROMPT = "the quick brown fox"


def _record(**kw) -> PeerRecord:
    base = dict(node_id="dev-a", version=PROTOCOL_VERSION, mesh=mesh_id(b"s" * 24), score=12.5, cores=4, memory_bytes=8 << 30,
                disk_bytes=100 << 30, budget_bytes=None, addresses=("10.0.0.2",), port=7340)
    return PeerRecord(**{**base, **kw})


# -- records (pure) ---------------------------------------------------------------------------------------------

def test_a_record_round_trips_through_its_txt_properties():
    for r in (_record(), _record(budget_bytes=2 << 30, score=0.5)):
        props = {k.encode(): v.encode() for k, v in r.properties().items()}
        assert decode(props, r.addresses, r.port) == r
        assert sum(len(k) + len(v) + 2 for k, v in props.items()) < 400  # small: one mDNS packet


@pytest.mark.parametrize("change, why", [
    ({"id": None}, "no 'id'"),
    ({"id": b"bad id!"}, "characters outside"),
    ({"mesh": b"xyz"}, "16 hex digits"),
    ({"score": b"fast"}, "not a number"),
    ({"score": b"nan"}, "positive number"),
    ({"score": b"-3"}, "positive number"),
    ({"cores": b"-1"}, "non-negative integer"),
    ({"mem": b"\xff\xfe"}, "not ASCII"),
    ({"disk": b"9" * 200}, "bytes long"),
    ({"v": None}, "no 'v'"),
])
def test_garbage_records_are_rejected_with_the_reason(change, why):
    props = {k.encode(): v.encode() for k, v in _record().properties().items()}
    for k, v in change.items():
        if v is None:
            props.pop(k.encode())
        else:
            props[k.encode()] = v
    with pytest.raises(RecordError, match=why):
        decode(props, ("10.0.0.2",), 7340)
    with pytest.raises(RecordError, match="port"):
        decode({k.encode(): v.encode() for k, v in _record().properties().items()}, ("10.0.0.2",), 0)


def test_election_is_highest_score_then_smallest_node_id():
    rs = [_record(node_id="b", score=5), _record(node_id="a", score=5), _record(node_id="c", score=4)]
    assert elect(rs).node_id == "a"
    assert elect([*rs, _record(node_id="z", score=9)]).node_id == "z"
    assert elect([]) is None


# -- mDNS on loopback ---------------------------------------------------------------------------------------------

async def test_a_garbage_txt_record_on_the_lan_is_ignored_with_a_log_line(caplog):
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(SERVICE_TYPE, f"junk-{id(caplog)}.{SERVICE_TYPE}", port=9,
                            properties={"id": "junk", "score": "lots"}, addresses=[socket.inet_aton(LOOPBACK)],
                            server="junk.local.")
    try:
        await (await zc.async_register_service(info, cooperating_responders=True))
        with caplog.at_level(logging.WARNING, logger="meshllm.discovery"):
            async with Browser(LOOPBACK) as b:
                for _ in range(50):
                    if info.name in b.rejected:
                        break
                    await b.changed(0.1)
                assert info.name in b.rejected and "no 'mesh'" in b.rejected[info.name]
                assert info.name not in b.peers
        assert any("ignoring mDNS record" in r.message for r in caplog.records)
    finally:
        await zc.async_close()


@pytest.fixture
def model(make_model):
    return make_model("gqa_tied", **VARIANTS["gqa_tied"])


@pytest.fixture
async def reference(model):
    async with LocalEngine(model) as engine:
        return await engine.generate(PROMPT, _params(), chat=False)


def _params():
    from meshllm import SamplingParams

    return SamplingParams(max_tokens=12, ignore_eos=True)


async def _until_seen(m: Mesh, node_id: str, timeout: float = 10.0) -> None:
    """Wait until the app's browser has the device's record (the next request plans with it)."""
    for _ in range(int(timeout / 0.1)):
        if node_id in {r.node_id for r in m._wanted()}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{node_id} was not discovered within {timeout} s")


async def _generate(m: Mesh):
    return await m.generate(PROMPT, max_tokens=12, ignore_eos=True, chat=False)


async def test_three_joined_devices_are_found_and_used_without_an_address(model, reference, tmp_path):
    secret = "three-devices-" + tmp_path.name
    devices = await join_all([("d-low", secret, 1.0), ("d-top", secret, 9.0), ("d-mid", secret, 4.0)], tmp_path)
    try:
        # tensor parallelism forced: on loopback the planner would run one device alone (see test_plans.py)
        async with Mesh(model, secret=secret, min_devices=3, timeout=20, interface=LOOPBACK, plan="tp") as m:
            assert sorted(d["node_id"] for d in m.devices) == ["d-low", "d-mid", "d-top"]
            hub = [d for d in m.devices if d["role"] == "hub"]
            assert [d["node_id"] for d in hub] == ["d-top"]  # the highest advertised score
            shares = {d["node_id"]: d["share"] for d in m.devices}
            assert shares["d-top"] > shares["d-mid"] > shares["d-low"]  # the split follows the scores
            out = await _generate(m)
            assert out.token_ids == reference.token_ids
            # two requests from one app run one after the other, and agree
            a, b = await asyncio.gather(_generate(m), _generate(m))
            assert a.token_ids == b.token_ids == reference.token_ids
            pieces = [p async for p in m.stream(PROMPT, max_tokens=12, ignore_eos=True, chat=False)]
            assert "".join(pieces) == reference.text
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


@pytest.mark.slow
async def test_two_meshes_on_one_interface_never_mix(model, reference, tmp_path):
    a, b = "mesh-a-" + tmp_path.name, "mesh-b-" + tmp_path.name
    devices = await join_all([("a-1", a, 2.0), ("a-2", a, 2.0), ("b-1", b, 50.0)], tmp_path)
    try:
        async with Mesh(model, secret=a, min_devices=2, timeout=20, interface=LOOPBACK) as m:
            assert sorted(d["node_id"] for d in m.devices) == ["a-1", "a-2"]
            assert (await _generate(m)).token_ids == reference.token_ids
        out = await survey(a.encode(), LOOPBACK, 1.5)
        groups = {d["node_id"]: d["group"] for d in out["devices"]}
        assert groups.get("a-1") == groups.get("a-2") == "ours" and groups.get("b-1") == "another mesh"
        ours = [d for d in out["devices"] if d["group"] == "ours"]
        assert all(d["rtt_s"] is not None and d["rtt_s"] < 1 for d in ours)
        assert [d["node_id"] for d in ours if d["would_be_hub"]] == ["a-1"]  # tie: the smaller node id
        with pytest.raises(MeshTimeoutError, match="found 1 device"):
            async with Mesh(model, secret=b, min_devices=2, timeout=2, interface=LOOPBACK):
                pass
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def test_devices_that_leave_or_join_between_requests_change_the_next_plan(model, reference, tmp_path):
    secret = "churn-" + tmp_path.name
    devices = await join_all([("c-1", secret, 3.0), ("c-2", secret, 2.0), ("c-3", secret, 1.0)], tmp_path)
    extra = None
    try:
        async with Mesh(model, secret=secret, min_devices=3, timeout=20, interface=LOOPBACK) as m:
            assert len(m.devices) == 3
            # a clean leave (SIGTERM: mDNS goodbye, links closed)
            assert await devices[0].stop() == 0
            out = await _generate(m)
            assert out.token_ids == reference.token_ids
            assert sorted(d["node_id"] for d in m.devices) == ["c-2", "c-3"]
            assert [d["node_id"] for d in m.devices if d["role"] == "hub"] == ["c-2"]  # re-elected
            # a crash (SIGKILL: no goodbye; its record stays until it expires): the link loss re-plans
            await devices[1].kill()
            out = await _generate(m)
            assert out.token_ids == reference.token_ids
            assert [d["node_id"] for d in m.devices] == ["c-3"]
            # a device that joins is used by the next request
            extra = await join("c-4", secret, tmp_path, score=8.0)
            await _until_seen(m, "c-4")
            out = await _generate(m)
            assert out.token_ids == reference.token_ids
            assert sorted(d["node_id"] for d in m.devices) == ["c-3", "c-4"]
            assert [d["node_id"] for d in m.devices if d["role"] == "hub"] == ["c-4"]
    finally:
        await asyncio.gather(*(d.stop() for d in devices if d.proc.returncode is None))
        if extra is not None:
            await extra.stop()


async def test_with_no_device_found_the_app_runs_here_alone_and_says_so(model, reference, caplog):
    with caplog.at_level(logging.WARNING, logger="meshllm.app"):
        async with Mesh(model, secret="nobody-has-this-secret", timeout=1.0, interface=LOOPBACK) as m:
            assert m.local and m.devices == [] and m.plan is None
            assert (await _generate(m)).token_ids == reference.token_ids
    assert any("running on this device alone" in r.message for r in caplog.records)


async def test_a_record_nobody_answers_behind_is_skipped_and_the_app_runs_here(model, reference, tmp_path, caplog):
    """A crashed device leaves its record behind until it expires: the app must not fail on it."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    secret = "ghost-" + tmp_path.name
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind((LOOPBACK, 0))
        dead_port = s.getsockname()[1]
    ghost = _record(node_id="ghost", mesh=mesh_id(secret.encode()), addresses=(LOOPBACK,), port=dead_port)
    zc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(SERVICE_TYPE, f"ghost-{tmp_path.name[-20:]}.{SERVICE_TYPE}", port=dead_port,
                            properties=ghost.properties(), addresses=[socket.inet_aton(LOOPBACK)],
                            server="ghost.local.")
    try:
        await (await zc.async_register_service(info, cooperating_responders=True))
        with caplog.at_level(logging.WARNING):
            async with Mesh(model, secret=secret, timeout=5, interface=LOOPBACK) as m:
                assert m.local
                assert (await _generate(m)).token_ids == reference.token_ids
                assert (await _generate(m)).token_ids == reference.token_ids  # no new plan attempt per request
        assert any("unreachable" in r.message for r in caplog.records)
    finally:
        await zc.async_close()


async def test_an_app_that_started_alone_moves_to_the_mesh_when_a_device_joins(model, reference, tmp_path):
    secret = "late-" + tmp_path.name
    device = None
    try:
        async with Mesh(model, secret=secret, timeout=1.0, interface=LOOPBACK) as m:
            assert m.local
            assert (await _generate(m)).token_ids == reference.token_ids
            device = await join("late-1", secret, tmp_path, score=1.0)
            await _until_seen(m, "late-1")
            out = await _generate(m)
            assert not m.local and [d["node_id"] for d in m.devices] == ["late-1"]
            assert [d["role"] for d in m.devices] == ["hub"]
            assert out.token_ids == reference.token_ids
        assert "rank 0/1" in device.log.read_text()  # the device loaded its shard of the plan
    finally:
        if device is not None:
            await device.stop()
