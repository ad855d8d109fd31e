"""A short chat with the mesh on the LAN: the model's chat template, a running history.

    MESHLLM_SECRET=... python examples/mesh_chat.py
"""

import asyncio
import sys

from meshllm import Mesh


async def main() -> None:
    questions = sys.argv[1:] or ["What is the capital of France?", "And of Italy?"]
    history = []
    async with Mesh() as m:
        where = "this device alone" if m.local else f"{len(m.devices)} device(s), hub " + \
            next(d["node_id"] for d in m.devices if d["role"] == "hub")
        print(f"[running on {where}]", file=sys.stderr)
        for q in questions:
            history.append({"role": "user", "content": q})
            reply = await m.chat(history, max_tokens=64)
            history.append({"role": "assistant", "content": reply.text})
            print(f"> {q}\n{reply.text}")


if __name__ == "__main__":
    asyncio.run(main())
