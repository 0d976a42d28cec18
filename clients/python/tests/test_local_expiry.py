"""The local expiry of a lease against a fake coordinator whose answers the test hands over when it
chooses: a `renewed` that comes late, after the next renewal went out, is dated from the renewal it
answers, not from the latest one sent."""

from __future__ import annotations

import asyncio

from fakes import FakeTransport, granted, rfc3339

LEASE_MS = 1500


async def test_a_late_renewed_is_dated_from_the_renewal_it_answers() -> None:
    transport = FakeTransport()
    lease, request_id = await granted(transport, LEASE_MS)

    def answer_renewed() -> None:
        # The coordinator's clock runs a minute ahead, so its expiry bounds nothing and the sending
        # of the renewal is what dates the lease here.
        transport.routes.route(
            "reply",
            {
                "request_id": request_id,
                "outcome": "renewed",
                "fence": 1,
                "lease_ms": LEASE_MS,
                "expires_at": rfc3339(60 + LEASE_MS / 1000),
            },
        )

    try:
        # The first renewal goes unanswered until the second is out.
        _, first_at = await transport.next("renew")
        _, second_at = await transport.next("renew")
        assert second_at > first_at
        # Now the answer to the first.
        answer_renewed()
        await asyncio.wait_for(lease._renewed.wait(), 10)
        # The coordinator may have handled the first renewal as soon as it was sent: its lease may end
        # a lease length after that, and the local bound must come a margin before.
        bound = first_at + LEASE_MS / 1000 - lease._margin()
        assert lease._lost_at <= bound + 1e-6, (
            f"the local expiry is {lease._lost_at - bound:.3f} s past the lease of the renewal "
            "that was answered"
        )
        # A timely answer to the next renewal moves the bound on, from that renewal.
        lease._renewed.clear()
        _, third_at = await transport.next("renew")
        answer_renewed()
        await asyncio.wait_for(lease._renewed.wait(), 10)
        assert lease._lost_at <= third_at + LEASE_MS / 1000 - lease._margin() + 1e-6
        assert lease._lost_at > bound
    finally:
        await lease._stop()
