"""Generate on this device with the embedded default model (or a model path given as the first argument).

    python examples/generate.py [MODEL] [PROMPT]
"""

import asyncio
import sys

from meshllm import LocalEngine, SamplingParams
from meshllm.model.default import default_model_path


async def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else await asyncio.to_thread(default_model_path)
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Give me two facts about the Moon."
    async with LocalEngine(model) as engine:
        async for piece in engine.stream(prompt, SamplingParams(max_tokens=96)):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    asyncio.run(main())
