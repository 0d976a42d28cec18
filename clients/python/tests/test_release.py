"""A release against a fake coordinator whose answers the test hands over when it chooses: a renewal
that crosses the release, rejected because the request has ended, does not make the lease lost."""

from __future__ import annotations

import asyncio

from fakes import FakeTransport, granted

LEASE_MS = 600


async def test_a_renewal_rejected_after_the_release_loses_nothing() -> None:
    transport = FakeTransport()
    lease, request_id = await granted(transport, LEASE_MS)
    try:
        # A renewal is out, unanswered, when the code holding the lease releases it.
        await transport.next("renew")
        releasing = asyncio.ensure_future(lease.release())
        release, _ = await transport.next("release")
        assert release["request_id"] == request_id
        # The coordinator took the release first: the renewal is rejected, the request having ended.
        transport.routes.route(
            "reply",
            {
                "request_id": request_id,
                "outcome": "rejected",
                "code": "already_ended",
                "error": f"request `{request_id}` has already ended (released)",
            },
        )
        transport.routes.route("reply", {"request_id": request_id, "outcome": "released"})
        await asyncio.wait_for(releasing, 10)
        assert lease.phase == "released"
        assert not lease.lost.is_set(), lease.lost_reason
        # No renewal goes out once the release did.
        release_at = next(at for kind, _, at in transport.sent if kind == "release")
        assert all(at <= release_at for kind, _, at in transport.sent if kind == "renew")
    finally:
        await lease._stop()


async def test_a_lease_lost_before_the_release_is_still_lost() -> None:
    transport = FakeTransport()
    lease, request_id = await granted(transport, LEASE_MS)
    try:
        await transport.next("renew")
        # The renewal is rejected before any release: the coordinator ended the request.
        transport.routes.route(
            "reply",
            {
                "request_id": request_id,
                "outcome": "rejected",
                "code": "already_ended",
                "error": f"request `{request_id}` has already ended (revoked)",
            },
        )
        await asyncio.wait_for(lease.lost.wait(), 10)
        assert "revoked" in (lease.lost_reason or "")
    finally:
        await lease._stop()
