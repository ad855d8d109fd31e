"""Stream an answer from the mesh on the LAN, piece by piece as it is generated.

    MESHLLM_SECRET=... python examples/mesh_stream.py [PROMPT]
"""

import asyncio
import sys

from meshllm import Mesh, Result


async def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Write a haiku about a small computer."
    async with Mesh() as m:
        result = Result()
        async for piece in m.stream(prompt, max_tokens=96, temperature=0.7, seed=1, result=result):
            print(piece, end="", flush=True)
        print()
        print(f"[{len(result.token_ids)} tokens, {result.finish_reason}]", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
