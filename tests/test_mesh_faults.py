"""Bad peers and failures against real device processes: refused, closed, named; never a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from helpers.checkpoints import VARIANTS
from helpers.devices import pid_listening_on
from helpers.wire import split_frames
from meshllm.errors import (
    AuthenticationError,
    LinkError,
    VersionMismatchError,
)
from meshllm.generation.loop import Result
from meshllm.generation.sampling import SamplingParams
from meshllm.net.link import Link, Timeouts, connect
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.mesh import MeshEngine, local_secret
from meshllm.wire.connection import Connection
from meshllm.wire.frames import HEADER, PROTOCOL_VERSION

PROMPT = "the quick brown fox"


def log_text(log_dir, i: int) -> str:
    return (log_dir / f"local-{i}.log").read_text(errors="replace")


async def wait_for_log(log_dir, i: int, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_text(log_dir, i)
        if needle in text:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{needle!r} not in device log:\n{log_text(log_dir, i)}")


async def generate_ok(folder, addresses, secret) -> None:
    async with MeshEngine(folder, addresses, secret) as mesh:
        result = await mesh.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
        assert len(result.token_ids) == 4


async def test_wrong_secret_is_refused_on_both_sides(make_model, tmp_path):
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(1, secret, verbose=True, log_dir=tmp_path) as addresses:
        with pytest.raises(AuthenticationError, match="secret"):
            async with MeshEngine(folder, addresses, b"not-the-secret"):
                pass
        text = await wait_for_log(tmp_path, 0, "authentication failed")
        assert "different mesh secret" in text and "--secret" in text
        await generate_ok(folder, addresses, secret)  # still serving


async def test_protocol_version_mismatch_is_refused_on_both_sides(make_model, tmp_path):
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(1, secret, verbose=True, log_dir=tmp_path) as addresses:
        host, port = addresses[0].rsplit(":", 1)
        loop = asyncio.get_running_loop()
        conn = Connection(secret, "future-peer", os.urandom(32), initiator=True, version=99)
        _, link = await loop.create_connection(lambda: Link(conn), host, int(port))
        with pytest.raises(VersionMismatchError, match=rf"version 99, the peer version {PROTOCOL_VERSION}"):
            await asyncio.wait_for(link.ready, 5)
        await wait_for_log(tmp_path, 0, "protocol version mismatch")
        await generate_ok(folder, addresses, secret)


async def raw_exchange(address: str, payload: bytes, *, eof: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the device closes; return what it sent."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    if eof:
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return data


def error_frames(data: bytes) -> list[dict]:
    return [f for f in split_frames(data) if f.get("t") == "error"]


async def test_malformed_input_closes_only_that_link(make_model, tmp_path):
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(2, secret, verbose=True, log_dir=tmp_path) as addresses:
        target = addresses[0]
        # a mesh session stays open across all the abuse below and must keep working
        async with MeshEngine(folder, addresses, secret) as mesh:
            first = await mesh.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), chat=False)

            garbage = await raw_exchange(target, b"\x00\x00\x00\x08notmsgpk")
            assert any("not valid msgpack" in f["reason"] for f in error_frames(garbage))

            oversized = await raw_exchange(target, b"\xff\xff\xff\xff" + b"x" * 16)
            assert any("exceeds" in f["reason"] for f in error_frames(oversized))

            await raw_exchange(target, HEADER.pack(1000) + b"\x81" * 10)  # truncated: EOF inside a frame
            await wait_for_log(tmp_path, 0, "truncated frame")

            html = await raw_exchange(target, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert error_frames(html)  # an HTTP client gets a clean refusal too

            # an authenticated peer that sends an unknown message type is cut off
            host, port = target.rsplit(":", 1)
            rogue = await connect(host, int(port), secret, "rogue")
            rogue.transport.write(rogue.conn.encode({"t": "warp-drive", "x": 1}))
            await asyncio.wait_for(rogue.closed, 5)
            assert "unknown message type" in str(rogue.error)

            # the device kept serving: the open session still generates the same tokens
            again = await mesh.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), chat=False)
            assert again.token_ids == first.token_ids
        await generate_ok(folder, addresses, secret)  # and new sessions are accepted


async def test_a_killed_device_is_noticed_fast_and_the_request_resumes(make_model, tmp_path, caplog):
    """SIGKILL one of three devices mid-request: noticed within moments, named in the log, and the request goes
    on over the two left, with the ids of an undisturbed run."""
    folder = make_model("gqa_long", **{**VARIANTS["gqa_tied"], "max_position_embeddings": 65536})
    secret = local_secret()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    async with LocalCluster(3, secret, log_dir=tmp_path) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            expected = (await mesh.generate(PROMPT, params, chat=False)).token_ids
            victim = mesh.members[2]
            result = Result()
            pieces = 0
            async for _ in mesh.stream(PROMPT, params, chat=False, result=result):
                pieces += 1
                if pieces == 5:
                    os.kill(pid_listening_on(victim.address), signal.SIGKILL)
                    kill_at = len(result.token_ids)
            assert result.token_ids == expected
            assert kill_at < len(expected)
            gap = result.token_times[kill_at] - result.token_times[kill_at - 1]
            assert gap < 10.0, f"took {gap:.1f} s to notice and resume"
            assert victim.address not in [m.address for m in mesh.members] and len(mesh.members) == 2
    assert "resuming the request" in caplog.text and victim.address in caplog.text, (victim.address, caplog.text)


async def test_a_request_that_loses_every_device_keeps_its_tokens_and_names_each_loss(make_model, tmp_path):
    folder = make_model("gqa_long", **{**VARIANTS["gqa_tied"], "max_position_embeddings": 65536})
    secret = local_secret()
    async with LocalCluster(2, secret, log_dir=tmp_path) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            names = {m.address: m.name for m in mesh.members}
            result = Result()
            pieces = 0
            with pytest.raises(LinkError) as info:
                async for _ in mesh.stream(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True), chat=False,
                                           result=result):
                    pieces += 1
                    if pieces in (5, 12):
                        os.kill(pid_listening_on(mesh.members[0].address), signal.SIGKILL)
    assert info.value.result is result and len(result.token_ids) >= 11  # what was made is kept, not thrown away
    for address, name in names.items():
        assert name in str(info.value) or address in str(info.value), (name, str(info.value))
    assert "the request had resumed after" in str(info.value)


async def test_ctrl_c_on_the_originator_stops_every_device(make_model, tmp_path):
    # a long context, so the request is still running when the signal comes
    folder = make_model("gqa_long", **{**VARIANTS["gqa_tied"], "max_position_embeddings": 65536})
    secret = local_secret()
    async with LocalCluster(2, secret, verbose=True, log_dir=tmp_path) as addresses:
        env = {**os.environ, "MESHLLM_SECRET": secret.decode()}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshllm", "generate", "--model", str(folder), "--raw", "--prompt", PROMPT,
            "--devices", ",".join(addresses), "--plan", "tp", "--max-tokens", "60000", "--ignore-eos",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        got = b""
        while len(got) < 20:  # generating: text is streaming out
            chunk = await asyncio.wait_for(proc.stdout.read(64), 60)
            assert chunk, (await proc.stderr.read()).decode()
            got += chunk
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 130
        for i in range(2):
            text = await wait_for_log(tmp_path, i, "aborted")
            assert "closed" in await wait_for_log(tmp_path, i, "session")
            assert "Traceback" not in text
        await generate_ok(folder, addresses, secret)  # the devices are free for the next request


async def test_device_keeps_serving_its_sockets_while_it_computes(make_model, tmp_path):
    """A ping sent mid-prefill is answered at once, not when the prefill's compute ends: matmuls run off the event
    loop. (Ordering alone cannot tell: a device that computed on its loop would send the pong right after the
    result, and both can arrive here in one burst.)"""
    folder = make_model("wide_long", hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    secret = local_secret()
    async with LocalCluster(1, secret, threads=1, log_dir=tmp_path) as addresses:
        host, port = addresses[0].rsplit(":", 1)
        loop = asyncio.get_running_loop()
        pong = loop.create_future()

        def on_message(link, msg):
            if msg["t"] == "pong" and not pong.done():
                pong.set_result(loop.time())

        async with MeshEngine(folder, addresses, secret) as mesh:
            prober = await connect(host, int(port), secret, "prober", on_message=on_message)
            ids = [(i * 7) % 500 + 3 for i in range(6000)]

            task = asyncio.ensure_future(mesh.score(ids))
            await asyncio.sleep(0.3)  # the prefill is computing on the device now
            assert not task.done(), "prefill finished too fast to probe; make the model bigger"
            sent = loop.time()
            prober.send({"t": "ping", "nonce": 1})
            await task
            done = loop.time()
            answered = await asyncio.wait_for(pong, 5)
            prober.close()
        # the prefill still had most of its compute ahead when the ping went out; the pong did not wait for it
        assert done - sent > 1.0, f"the prefill ended {done - sent:.2f} s after the ping: too soon to tell"
        assert answered - sent < (done - sent) / 4, (f"pong after {answered - sent:.2f} s, the prefill's compute "
                                                     f"ended {done - sent:.2f} s after the ping")


@pytest.mark.slow  # 15 s; the default run keeps the killed-device cases
async def test_a_hung_device_is_found_by_its_silence_and_idle_links_stay_open(make_model, tmp_path, caplog):
    """A device that stops answering without closing its sockets (a hang, a closed laptop lid, a cable pulled with
    no FIN) is found within Timeouts.silence, mid-request, and named: not after the 120 s step timeout. Links with
    nothing to carry stay open meanwhile, kept alive by beats."""
    folder = make_model("gqa_long", **{**VARIANTS["gqa_tied"], "max_position_embeddings": 65536})
    secret = local_secret()
    timeouts = Timeouts(silence=5.0)
    async with LocalCluster(2, secret, log_dir=tmp_path) as addresses:
        async with MeshEngine(folder, addresses, secret, timeouts=timeouts) as mesh:
            first = await mesh.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
            await asyncio.sleep(timeouts.silence + 2)  # idle for longer than the silence allowed
            assert all(m.link.is_open for m in mesh.members)
            again = await mesh.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
            assert again.token_ids == first.token_ids

            victim = mesh.members[1]
            pid = pid_listening_on(victim.address)
            params = SamplingParams(max_tokens=30, ignore_eos=True)
            expected = (await mesh.generate(PROMPT, params, chat=False)).token_ids
            result, pieces = Result(), 0
            try:
                async for _ in mesh.stream(PROMPT, params, chat=False, result=result):
                    pieces += 1
                    if pieces == 3:
                        os.kill(pid, signal.SIGSTOP)
                        stop_at = len(result.token_ids)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert result.token_ids == expected  # resumed on the device left
            gap = result.token_times[stop_at] - result.token_times[stop_at - 1]
            assert gap < timeouts.silence + 4, f"took {gap:.1f} s to notice and resume"
            assert [m.address for m in mesh.members] != [victim.address] and len(mesh.members) == 1
    # named by its node id and its own address (every device here shares 127.0.0.1: the port tells them apart)
    assert f"no word from {victim.link.conn.peer_id} ({victim.address})" in caplog.text, caplog.text


async def test_a_hub_lost_between_requests_fails_no_request_on_the_workers(make_model, tmp_path):
    """Between requests nothing is running: a worker that loses the hub (as at every clean shutdown, where the hub
    closes its links first) logs no failed request; the next request is refused naming the lost hub."""
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(3, secret, verbose=True, log_dir=tmp_path) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            await mesh.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), chat=False)
            hub = mesh.members[mesh.plan.hub]
            workers = [m.rank for m in mesh.members if m.rank != mesh.plan.hub]
            hub.link.close()  # the hub drops the session and closes its links to the workers
            for i in workers:
                await wait_for_log(tmp_path, i, "its next request will be refused")
            # the request resumes over the workers left (the lost hub's name is in the log)
            result = await mesh.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), chat=False)
            assert len(result.token_ids) == 3 and hub.address not in [m.address for m in mesh.members]
        await generate_ok(folder, addresses, secret)  # the devices serve the next session
    for i in workers:
        assert "failed" not in log_text(tmp_path, i), log_text(tmp_path, i)


async def test_a_request_cancelled_at_any_moment_leaves_the_mesh_ready(make_model):
    """Cancel a request at moments spread over its prefill and first steps (an HTTP client going away, Ctrl-C in
    an app): each next request runs at once and gives the ids a fresh mesh gives. Found by `serve`: a cancellation
    landing as an allreduce sum arrived was dropped by wait_for, the aborted step ran on into rounds nobody joined
    and the next request hung; and the hub's late result of an aborted step closed its link."""
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    async with LocalCluster(2, secret, threads=1) as addresses, MeshEngine(folder, addresses, secret,
                                                                           threads=1) as m:
        fresh = (await m.generate(PROMPT, params, chat=False)).token_ids
        for i in range(16):
            async def run():
                async for _ in m.stream(PROMPT, SamplingParams(max_tokens=100, ignore_eos=True), chat=False):
                    pass

            task = asyncio.ensure_future(run())
            await asyncio.sleep(0.0015 * i)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(10):
                again = await m.generate(PROMPT, params, chat=False)
            assert again.token_ids == fresh, f"after a cancel at {1.5 * i:.1f} ms"
