"""The diarization job: a batch job that wants the whole GPU, in blocking code (no asyncio).

Run: python examples/diarization.py [nats://127.0.0.1:4222]
"""

from __future__ import annotations

import sys
import time

from gpu_coordinator import GrantTimeout
from gpu_coordinator.sync import Client


def diarize(recording: str) -> None:
    time.sleep(0.5)  # stands for the model's passes over the recording


def main(url: str) -> None:
    client = Client.connect(url, service="diar", prefix="gpu")
    try:
        for recording in ["meeting-1.wav", "meeting-2.wav"]:
            try:
                # No vram_mb: the whole GPU; priority 1, above background transcription.
                with client.lease(priority=1, timeout_ms=60000) as lease:
                    print(f"[diar] {recording} on GPU {lease.gpu} (fence {lease.fence})")
                    diarize(recording)
            except GrantTimeout:
                print(f"[diar] {recording}: no GPU within a minute, later")
    finally:
        client.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222")
