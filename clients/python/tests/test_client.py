"""The Python client against a real coordinator: grant, renew, release, pause -> ACK -> resume, timeout,
rejection, a revoke for a missed ACK, a NATS restart, the HTTP transport and the blocking wrapper."""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest

from gpu_coordinator import (
    Client,
    GrantTimeout,
    LeaseLost,
    PauseOrder,
    Rejected,
    ResumeOrder,
    Unavailable,
)
from gpu_coordinator import sync as blocking

import json
import subprocess
import tempfile
from pathlib import Path

from conftest import Coordinator, NatsServer, binary, unique


async def until(what: str, check: Any, within: float = 20.0) -> None:
    """Waits for `check()` (sync or async) to hold, looking every 50 ms."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_lease_is_granted_renewed_and_released_on_exit(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    client = await Client.connect(coordinator.nats_url, service="chat", prefix=coordinator.prefix)
    try:
        async with client.lease(priority=0, vram_mb=20000, lease_ms=600) as lease:
            assert lease.gpu == "0"
            assert lease.fence >= 1
            assert lease.vram_mb == 20000
            doc = await coordinator.status()
            assert coordinator.holders(doc) == [lease.request_id]
            # Held for more than three lease lengths: renewed, never lost.
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0
            while loop.time() < end:
                assert lease.usable(), lease.lost_reason
                await asyncio.sleep(0.05)
            assert not lease.lost.is_set()
        doc = await coordinator.status()
        assert coordinator.holders(doc) == [], "released on exit"
    finally:
        await client.close()


async def test_pause_ack_resume(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    url, prefix = coordinator.nats_url, coordinator.prefix
    worker = await Client.connect(url, service="asr", prefix=prefix)
    chat = await Client.connect(url, service="chat", prefix=prefix)
    seen: List[str] = []
    resumed = asyncio.Event()

    async def on_pause(order: PauseOrder) -> None:
        seen.append(f"pause {order.fence}")

    async def on_resume(order: ResumeOrder) -> None:
        seen.append(f"resume {order.fence}")
        resumed.set()

    try:
        async with worker.lease(
            priority=2, vram_mb=20000, on_pause=on_pause, on_resume=on_resume
        ) as background:
            first = background.fence
            async with chat.lease(priority=0, vram_mb=20000) as urgent:
                assert seen == [f"pause {first}"], "paused and acknowledged before the grant"
                assert not background.usable()
                assert urgent.fence > first
            await asyncio.wait_for(resumed.wait(), 20)
            assert seen == [f"pause {first}", f"resume {background.fence}"]
            assert background.fence > first, "a resume brings a new fence"
            await until("the worker is active again", background.usable)
    finally:
        await chat.close()
        await worker.close()


async def test_a_release_that_crossed_a_resume_ends_the_resumed_lease(coordinator_factory: Any) -> None:
    import nats

    coordinator: Coordinator = await coordinator_factory()
    url, prefix = coordinator.nats_url, coordinator.prefix
    worker = await Client.connect(url, service="asr", prefix=prefix)
    chat = await Client.connect(url, service="chat", prefix=prefix)
    nc = await nats.connect(url)
    rejections = await nc.subscribe(f"{prefix}.event.rejected.asr")
    pausing, go = asyncio.Event(), asyncio.Event()

    async def on_pause(order: PauseOrder) -> None:
        # Holds the lease's reader here, so that it hears of the resume only after its release.
        pausing.set()
        await go.wait()

    try:
        lease = await worker.acquire(priority=2, vram_mb=20000, on_pause=on_pause)
        first = lease.fence
        urgent = asyncio.ensure_future(chat.acquire(priority=0, vram_mb=20000))
        await asyncio.wait_for(pausing.wait(), 20)
        # The worker's ACK, sent beside its reader; the chat holds the GPU, then leaves it, and the
        # coordinator resumes the worker under a new fence.
        ack = {"request_id": lease.request_id, "fence": first, "action": "paused"}
        await nc.jetstream().publish(f"{prefix}.ack.asr", json.dumps(ack).encode())
        granted = await asyncio.wait_for(urgent, 20)
        await granted.release()
        await granted._stop()

        async def resumed() -> bool:
            doc = await coordinator.status()
            holders = [h for g in doc["gpus"] for h in g["holders"]]  # type: ignore[union-attr]
            return [(h["request_id"], h["fence"] > first) for h in holders] == [(lease.request_id, True)]

        await until("the worker resumed at the coordinator", resumed)
        # The worker releases under the fence it knows: stale there.
        release = asyncio.ensure_future(lease.release())
        rejected = json.loads((await rejections.next_msg(timeout=20)).data)
        assert "stale fence" in rejected["detail"], rejected
        go.set()
        await asyncio.wait_for(release, 20)
        assert lease.phase == "released"
        assert lease.fence > first, "released under the fence the rejection named"
        assert coordinator.holders(await coordinator.status()) == []
        await lease._stop()
    finally:
        go.set()
        await nc.close()
        await chat.close()
        await worker.close()


async def test_a_request_that_cannot_be_granted_in_time_times_out(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    url, prefix = coordinator.nats_url, coordinator.prefix
    holder = await Client.connect(url, service="diar", prefix=prefix)
    other = await Client.connect(url, service="asr", prefix=prefix)
    try:
        async with holder.lease(priority=0):  # the whole GPU
            with pytest.raises(GrantTimeout):
                async with other.lease(priority=1, vram_mb=1000, timeout_ms=500):
                    pass
    finally:
        await other.close()
        await holder.close()


async def test_a_rejection_carries_the_coordinators_reason(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    client = await Client.connect(coordinator.nats_url, service="chat", prefix=coordinator.prefix)
    try:
        with pytest.raises(Rejected, match="vram_mb"):
            async with client.lease(priority=0, vram_mb=999_999):
                pass
    finally:
        await client.close()


async def test_a_holder_that_does_not_ack_is_revoked(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory(ack_deadline_ms=300)
    url, prefix = coordinator.nats_url, coordinator.prefix
    worker = await Client.connect(url, service="asr", prefix=prefix)
    chat = await Client.connect(url, service="chat", prefix=prefix)
    try:
        with pytest.raises(LeaseLost):
            # Preemptible, but no handler to free the VRAM: no ACK.
            async with worker.lease(priority=2, vram_mb=20000, lease_ms=1000, preemptible=True) as lease:
                urgent = asyncio.ensure_future(chat.acquire(priority=0, vram_mb=20000))
                await asyncio.wait_for(lease.lost.wait(), 20)
                assert not lease.usable()
                granted = await asyncio.wait_for(urgent, 20)
                assert granted.fence > lease.fence
                await granted.release()
                await granted._stop()
    finally:
        await chat.close()
        await worker.close()


async def test_a_nats_restart_loses_no_grant(coordinator_factory: Any, nats_server: NatsServer) -> None:
    coordinator: Coordinator = await coordinator_factory(nats_url=nats_server.url)
    url, prefix = coordinator.nats_url, coordinator.prefix
    holder = await Client.connect(url, service="diar", prefix=prefix)
    waiter = await Client.connect(url, service="asr", prefix=prefix)
    try:
        lease = await holder.acquire(priority=0, lease_ms=5000)
        queued = asyncio.ensure_future(waiter.acquire(priority=1, vram_mb=1000, timeout_ms=30000))
        await until(
            "the second request queued",
            lambda: _queued(coordinator),
        )
        nats_server.restart()
        # The holder's lease lives through the restart; its release, published after it, grants the
        # queued request, whose grant reaches it through the output stream.
        await until("the holder renews again", lease.usable)
        await lease.release()
        await lease._stop()
        granted = await asyncio.wait_for(queued, 30)
        assert granted.fence > lease.fence
        await granted.release()
        await granted._stop()
    finally:
        await waiter.close()
        await holder.close()


async def _queued(coordinator: Coordinator) -> bool:
    doc = await coordinator.status()
    return bool(doc.get("queue_total"))


async def test_pause_ms_picks_the_holder_that_frees_its_vram_soonest(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    url, prefix = coordinator.nats_url, coordinator.prefix
    diar = await Client.connect(url, service="diar", prefix=prefix)
    fast = await Client.connect(url, service="tts", prefix=prefix)
    slow = await Client.connect(url, service="asr", prefix=prefix)
    chat = await Client.connect(url, service="chat", prefix=prefix)
    paused: List[str] = []

    def pauses(service: str) -> Any:
        async def on_pause(order: PauseOrder) -> None:
            paused.append(service)

        return on_pause

    async def queued(n: int) -> bool:
        return (await coordinator.status()).get("queue_total") == n

    try:
        whole = await diar.acquire(priority=0)
        # Both wait behind a whole-GPU holder, the fast one first, and are granted together in one
        # pass: neither is more recently granted, and without the hint the later arrival (the slow
        # one) would be the one paused.
        first = asyncio.ensure_future(
            fast.acquire(priority=2, vram_mb=10000, pause_ms=300, on_pause=pauses("tts"))
        )
        await until("the fast one queued", lambda: queued(1))
        second = asyncio.ensure_future(
            slow.acquire(priority=2, vram_mb=10000, pause_ms=5000, on_pause=pauses("asr"))
        )
        await until("both queued", lambda: queued(2))
        await whole.release()
        await whole._stop()
        fast_lease = await asyncio.wait_for(first, 20)
        slow_lease = await asyncio.wait_for(second, 20)
        doc = await coordinator.status()
        gpus = doc["gpus"]
        assert isinstance(gpus, list)
        hints = {h["service_id"]: h.get("pause_ms") for g in gpus for h in g["holders"]}
        assert hints == {"tts": 300, "asr": 5000}, "the status shows each holder's hint"

        urgent = await asyncio.wait_for(chat.acquire(priority=0, vram_mb=14000), 20)
        assert paused == ["tts"], "the holder that frees its VRAM soonest"
        assert slow_lease.usable()
        await urgent.release()
        await urgent._stop()
        await until("the fast one resumed", fast_lease.usable)
        for lease in (fast_lease, slow_lease):
            await lease.release()
            await lease._stop()
    finally:
        await chat.close()
        await slow.close()
        await fast.close()
        await diar.close()


async def test_the_http_transport_grants_pauses_and_resumes(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    worker = await Client.connect_http(coordinator.http_url, service="asr")
    chat = await Client.connect_http(coordinator.http_url, service="chat")
    seen: List[str] = []
    resumed = asyncio.Event()

    async def on_pause(order: PauseOrder) -> None:
        seen.append("pause")

    async def on_resume(order: ResumeOrder) -> None:
        seen.append("resume")
        resumed.set()

    try:
        async with worker.lease(
            priority=2, vram_mb=20000, lease_ms=2000, on_pause=on_pause, on_resume=on_resume
        ) as background:
            first = background.fence
            async with chat.lease(priority=0, vram_mb=20000) as urgent:
                assert seen == ["pause"]
                assert urgent.fence > first
            await asyncio.wait_for(resumed.wait(), 20)
            assert background.fence > first
            # Renewed over HTTP past its lease length.
            await asyncio.sleep(2.5)
            assert background.usable(), background.lost_reason
        doc = await coordinator.status()
        assert coordinator.holders(doc) == []
    finally:
        await chat.close()
        await worker.close()


async def test_the_blocking_client(coordinator_factory: Any) -> None:
    coordinator: Coordinator = await coordinator_factory()
    # Blocking calls, as code without asyncio makes them (the client runs its own loop in a thread).
    client = blocking.Client.connect(coordinator.nats_url, service="tts", prefix=coordinator.prefix)
    try:
        with client.lease(priority=1, vram_mb=4000) as lease:
            assert lease.gpu == "0"
            assert lease.usable()
            assert client.status()["gpus"][0]["holders"][0]["request_id"] == lease.request_id
        assert client.status()["gpus"][0]["holders"] == []
    finally:
        client.close()


async def test_with_the_credentials_nats_auth_writes(coordinator_factory: Any) -> None:
    prefix = f"tpy-{unique().replace('_', '-')}"
    out = tempfile.mkdtemp(prefix="py-auth-")
    subprocess.run(
        [binary(), "nats-auth", "--services", "chat", "--out", out, "--prefix", prefix],
        check=True,
        capture_output=True,
    )
    server = NatsServer(conf=str(Path(out) / "nats-server.conf"))
    try:
        users = json.loads((Path(out) / "users.json").read_text())
        url = lambda user: f"nats://{user}:{users[user]['password']}@127.0.0.1:{server.port}"
        coordinator: Coordinator = await coordinator_factory(
            nats_url=url("coordinator"), prefix=prefix
        )
        client = await Client.connect(url("chat"), service="chat", prefix=prefix)
        try:
            async with client.lease(priority=0, vram_mb=1000, lease_ms=600) as lease:
                await asyncio.sleep(1.0)  # renewed under the service's permissions
                assert lease.usable(), lease.lost_reason
            doc = await coordinator.status()
            assert coordinator.holders(doc) == []
        finally:
            await client.close()
        # Another service's subjects are not chat's to use.
        with pytest.raises(Unavailable, match="credentials"):
            await Client.connect(url("chat"), service="asr", prefix=prefix)
    finally:
        server.close()
