"""Split the embedded default model over 3 device processes on this machine and stream an answer.

    python examples/mesh_local.py [PROMPT]
"""

import asyncio
import os
import sys

from meshllm import LocalCluster, MeshEngine, SamplingParams
from meshllm.model.default import default_model_path


async def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three rivers in Europe."
    model = await asyncio.to_thread(default_model_path)
    secret = os.urandom(16).hex().encode()
    async with LocalCluster(3, secret) as addresses, MeshEngine(model, addresses, secret) as mesh:
        print(f"hub: {mesh.members[mesh.plan.hub].name}", file=sys.stderr)
        async for piece in mesh.stream(prompt, SamplingParams(max_tokens=96)):
            print(piece, end="", flush=True)
        print()
        for d in await mesh.devices():
            print(f"  {d['id']:<16} {d['role']:<10} share {d['share']:.2f}  peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
