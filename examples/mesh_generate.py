"""Generate with the devices of your mesh on the LAN: no addresses, found by mDNS.

On each device:   MESHLLM_SECRET=... python -m meshllm join
Here:             MESHLLM_SECRET=... python examples/mesh_generate.py [PROMPT]

With no device found (or no secret) it runs on this machine alone and says so.
"""

import asyncio
import sys

from meshllm import Mesh


async def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Name three rivers in Europe."
    async with Mesh(timeout=5) as m:
        if m.plan is not None:
            print(f"plan: {m.plan.describe()}", file=sys.stderr)
        for d in m.devices:
            print(f"  {d['node_id']:<16} {d['address']:<22} {d['role']:<7} share {d['share']:.2f}", file=sys.stderr)
        result = await m.generate(prompt, max_tokens=96)
        print(result.text)
        print(f"{len(result.token_ids)} tokens, TTFT {result.ttft_s:.2f} s, {result.token_latency_s * 1e3:.0f} ms/token",
              file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
