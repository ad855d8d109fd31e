"""KV prefix reuse: a request that starts with the last request's ids computes only what follows, and its output
is the same as without reuse (one device and a mesh of real device processes), with what was reused reported."""

from __future__ import annotations

import asyncio


from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret

TURNS = ["Hello there.", "Tell me more.", "Why is that?", "Say it again, shorter.", "Thanks, bye."]
N_NEW = 10


async def chat_turns(engine, reuse: bool) -> list[tuple[list[int], int, int]]:
    """A 5-turn chat (greedy): per turn, (generated ids, prompt tokens, cached tokens)."""
    engine.reuse_prefix = reuse
    messages, out = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        r = await engine.generate(messages, SamplingParams(max_tokens=N_NEW), chat=True)
        out.append((r.token_ids, r.prompt_tokens, r.cached_tokens))
        messages.append({"role": "assistant", "content": r.text})
    return out


def check(on, off) -> None:
    assert [ids for ids, _, _ in on] == [ids for ids, _, _ in off]  # reuse never changes the output
    assert all(cached == 0 for _, _, cached in off)
    assert on[0][2] == 0
    for (_, prompt, cached), (prev_ids, prev_prompt, _) in zip(on[1:], on[:-1]):
        # each turn re-sends the conversation: at least the last turn's prompt is held, never the whole prompt
        assert prev_prompt <= cached < prompt


def test_one_device_chat_reuses_the_prefix(make_model):
    model = make_model("gqa_tied")

    async def main():
        async with LocalEngine(model, threads=1) as e:
            on = await chat_turns(e, True)
            off = await chat_turns(e, False)
            return on, off

    check(*asyncio.run(main()))


def test_mesh_chat_reuses_the_prefix_on_every_device(make_model):
    model = make_model("gqa_tied")

    async def main():
        secret = local_secret()
        async with LocalCluster(2, secret, threads=1) as addresses, \
                MeshEngine(model, addresses, secret, threads=1) as m:
            on = await chat_turns(m, True)
            off = await chat_turns(m, False)
            return on, off

    check(*asyncio.run(main()))


def test_a_different_prompt_reuses_only_what_it_shares(make_model):
    """A prompt that shares k ids with the last request reuses exactly k; a request after a failed one reuses
    nothing; score() in between leaves nothing to reuse."""
    model = make_model("gqa_tied")

    async def main():
        async with LocalEngine(model, threads=1) as e:
            text = "the cat sat on the mat and looked at the dog"
            ids = e.encode_prompt(text, False)
            first = await e.generate(text, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
            assert first.cached_tokens == 0
            # the caches hold the prompt and the generated ids fed back (all but the last)
            assert e.reusable(ids + first.token_ids) == len(ids) + 3
            other = ids[:5] + [i for i in range(3, 40) if i != ids[5]][:4]
            assert e.reusable(other) == 5
            again = await e.generate(text, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
            assert again.cached_tokens == len(ids) - 1 and again.token_ids == first.token_ids
            await e.score(ids)
            assert e.reusable(ids) == 0
            # a cancelled request leaves nothing reusable
            await e.generate(text, SamplingParams(max_tokens=4), chat=False)
            assert e.reusable(ids) == len(ids)
            agen = e.stream(text, SamplingParams(max_tokens=50, ignore_eos=True), chat=False)
            await agen.__anext__()
            await agen.aclose()
            assert e.reusable(ids) == 0

    asyncio.run(main())


def test_a_device_refuses_a_prefix_it_does_not_hold(make_model, caplog):
    """A begin asking to keep positions the device does not hold is refused, naming why, instead of computing on
    stale caches: the request resumes on a fresh session, computing every position, with the ids of a clean run."""
    from meshllm.generation.loop import Result, generate

    model = make_model("gqa_tied")

    async def run(m, ids):
        result = Result()
        async for _ in generate(m, m.tokenizer, ids, SamplingParams(max_tokens=4), result):
            pass
        return result

    async def main():
        secret = local_secret()
        async with LocalCluster(1, secret, threads=1) as addresses, MeshEngine(model, addresses, secret,
                                                                               threads=1) as m:
            ids = [5, 6, 7, 8, 9, 10, 11, 12]
            clean = await run(m, ids)
            await m.replan(m.addresses)  # a new session: the device holds no caches of ours
            m._kv_ids = ids[:5]  # the originator wrongly believes the device holds these
            resumed = await run(m, ids)
            assert resumed.token_ids == clean.token_ids
            assert "dropped since" in caplog.text and "resuming" in caplog.text, caplog.text
            fresh = await run(m, ids)
            assert len(fresh.token_ids) == 4

    asyncio.run(main())
