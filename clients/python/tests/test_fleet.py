"""With node agents a request may name a host, or a GPU as `<host>/<id>`: the client sends them as
given, and leaves them out when not given."""

from __future__ import annotations

import asyncio

from fakes import FakeTransport

from gpu_coordinator import Client


async def test_a_host_is_sent_with_the_request_and_left_out_when_not_given() -> None:
    transport = FakeTransport()
    client = Client(transport)
    pinned = asyncio.ensure_future(client.acquire(priority=1, host="h2", timeout_ms=50))
    body, _ = await transport.next("request")
    assert body["host"] == "h2"
    assert "gpu" not in body
    anywhere = asyncio.ensure_future(client.acquire(priority=1, gpu="h1/0", timeout_ms=50))
    body, _ = await transport.next("request")
    assert body["gpu"] == "h1/0"
    assert "host" not in body
    for task in (pinned, anywhere):
        task.cancel()
    await asyncio.gather(pinned, anywhere, return_exceptions=True)
