"""A client is an async context manager: leaving the block closes its transport, even on an error."""

from __future__ import annotations

import pytest
from fakes import FakeTransport

from gpu_coordinator import Client


async def test_leaving_the_block_closes_the_transport() -> None:
    transport = FakeTransport()
    async with Client(transport) as client:
        assert client.service == "chat"
        assert not transport.closed
    assert transport.closed


async def test_an_error_in_the_block_closes_the_transport_too() -> None:
    transport = FakeTransport()
    with pytest.raises(RuntimeError, match="boom"):
        async with Client(transport):
            raise RuntimeError("boom")
    assert transport.closed
