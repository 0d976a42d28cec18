"""The chat service: latency first. Each answer takes the GPU at priority 0, pausing background work.

Run: python examples/chat.py [nats://127.0.0.1:4222]  (against `gpu-coordinator serve`)
"""

from __future__ import annotations

import asyncio
import sys

from gpu_coordinator import Client, GrantTimeout


async def answer(question: str) -> str:
    await asyncio.sleep(0.3)  # stands for the LLM's forward passes
    return f"an answer to {question!r}"


async def main(url: str) -> None:
    client = await Client.connect(url, service="chat", prefix="gpu")
    try:
        for question in ["hello", "what is a fence?", "bye"]:
            try:
                async with client.lease(priority=0, vram_mb=20000, timeout_ms=30000) as lease:
                    print(f"[chat] {lease.gpu} (fence {lease.fence}, waited {lease.waited_ms} ms)")
                    print(f"[chat] {await answer(question)}")
            except GrantTimeout as e:
                print(f"[chat] no GPU in time: {e}")
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
