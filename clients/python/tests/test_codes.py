"""The client decides on a rejection's `code`, never on its sentence: against a fake coordinator whose
answers the test routes."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import pytest
from fakes import FakeTransport, granted

from gpu_coordinator import LEASE_GONE, Client, Rejected, RejectCode

LEASE_MS = 1500


@pytest.mark.parametrize(
    "code,lost",
    [(code.value, True) for code in LEASE_GONE]
    + [
        ("stale_fence", False),
        ("invalid_input", False),
        ("a_code_from_a_newer_coordinator", False),
        (None, False),
    ],
)
async def test_a_renewal_rejected_for_a_lease_that_is_gone_loses_it_now(
    code: Optional[str], lost: bool
) -> None:
    transport = FakeTransport()
    lease, request_id = await granted(transport, LEASE_MS)
    try:
        await transport.next("renew")
        rejected: Any = {
            "request_id": request_id,
            "outcome": "rejected",
            # The sentence an older client matched on: it decides nothing now.
            "error": f"request `{request_id}` has already ended (released); not holding",
        }
        if code is not None:
            rejected["code"] = code
        transport.routes.route("reply", rejected)
        if lost:
            await asyncio.wait_for(lease.lost.wait(), 10)
            assert not lease.usable()
        else:
            # The next renewal goes out: the rejection was read, and the lease is still held.
            await transport.next("renew")
            assert not lease.lost.is_set()
            assert lease.usable()
    finally:
        await lease._stop()


async def test_a_rejected_request_raises_with_its_code() -> None:
    for code, expected in [
        ("unknown_gpu", RejectCode.UNKNOWN_GPU),
        ("a_code_from_a_newer_coordinator", "a_code_from_a_newer_coordinator"),
        (None, None),
    ]:
        transport = FakeTransport()
        client = Client(transport)
        acquiring = asyncio.ensure_future(client.acquire(priority=0, vram_mb=1000, gpu="g9"))
        request, _ = await transport.next("request")
        reply: Any = {
            "request_id": request["request_id"],
            "outcome": "rejected",
            "error": "field `gpu`: no GPU `g9` is managed here",
        }
        if code is not None:
            reply["code"] = code
        transport.routes.route("reply", reply)
        with pytest.raises(Rejected, match="g9") as raised:
            await acquiring
        assert raised.value.code == expected
