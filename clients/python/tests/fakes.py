"""A fake coordinator for the client's unit tests: it stores what the client publishes and answers only
what the test routes, when the test chooses."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import List, Optional, Tuple

from gpu_coordinator import Client, Lease
from gpu_coordinator._transport import Doc, Routes, Transport


class FakeTransport(Transport):
    """Stores every input with the loop time it was published at; answers only what the test routes."""

    def __init__(self) -> None:
        self.service = "chat"
        self.routes = Routes()
        self.sent: List[Tuple[str, Doc, float]] = []
        self.closed = False
        self._published: "asyncio.Queue[Tuple[str, Doc, float]]" = asyncio.Queue()

    async def start(self) -> None:
        pass

    async def publish(self, kind: str, body: Doc, msg_id: str, deadline: float) -> Optional[Doc]:
        entry = (kind, body, asyncio.get_running_loop().time())
        self.sent.append(entry)
        self._published.put_nowait(entry)
        return None

    async def next(self, kind: str) -> Tuple[Doc, float]:
        """The next input of `kind` published, with its loop time."""
        while True:
            sent_kind, body, at = await asyncio.wait_for(self._published.get(), 10)
            if sent_kind == kind:
                return body, at

    async def status(self) -> Doc:
        return {}

    async def close(self) -> None:
        self.closed = True


def rfc3339(seconds_from_now: float) -> str:
    at = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def granted(transport: FakeTransport, lease_ms: int) -> Tuple[Lease, str]:
    """A lease of `lease_ms` acquired through `transport`, the fake coordinator granting it at once
    (fence 1, on GPU 0); with its request id."""
    client = Client(transport)
    acquiring = asyncio.ensure_future(client.acquire(priority=0, vram_mb=1000, lease_ms=lease_ms))
    request, _ = await transport.next("request")
    request_id = str(request["request_id"])
    transport.routes.route(
        "reply",
        {
            "request_id": request_id,
            "outcome": "granted",
            "gpu": "0",
            "fence": 1,
            "lease_ms": lease_ms,
            "expires_at": rfc3339(lease_ms / 1000),
        },
    )
    return await acquiring, request_id
