"""The transcription worker: throughput, in the background. It works in chunks, frees its VRAM when
asked to pause, and reloads when resumed.

Run: python examples/transcriber.py [nats://127.0.0.1:4222]
"""

from __future__ import annotations

import asyncio
import sys

from gpu_coordinator import Client, LeaseLost, PauseOrder, ResumeOrder

loaded = False


async def on_pause(order: PauseOrder) -> None:
    global loaded
    print(f"[asr] pausing for: {order.reason}")
    loaded = False  # stands for moving the model to the CPU and freeing the cache


async def on_resume(order: ResumeOrder) -> None:
    global loaded
    print(f"[asr] resumed on {order.gpu} under fence {order.fence}")
    loaded = True


async def main(url: str, chunks: int = 50) -> None:
    global loaded
    client = await Client.connect(url, service="asr", prefix="gpu")
    try:
        async with client.lease(
            priority=2, vram_mb=8000, on_pause=on_pause, on_resume=on_resume
        ) as lease:
            loaded, done = True, 0
            while done < chunks:
                if not lease.usable():  # pausing, paused, or lost
                    lease.check()
                    await asyncio.sleep(0.05)
                    continue
                await asyncio.sleep(0.1)  # one chunk of audio on the GPU
                done += 1
            print(f"[asr] {done} chunks transcribed")
    except LeaseLost as e:
        print(f"[asr] the GPU was taken away: {e}")
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
