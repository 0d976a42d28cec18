"""The client: requests, leases that renew themselves, pause and resume handlers, local expiry."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Awaitable, Callable, List, Literal, Optional, Type

from ._transport import Answer, Doc, Transport
from .documents import ControlDoc, ReplyDoc, StatusDoc
from .errors import (
    LEASE_GONE,
    CoordinatorError,
    GrantTimeout,
    LeaseLost,
    Rejected,
    RejectCode,
    Unavailable,
    reject_code,
)

log = logging.getLogger("gpu_coordinator")

# After `timeout_ms`, how long to wait still for the coordinator's answer before giving up.
REPLY_GRACE = 5.0
# How long a release waits for its `released`.
RELEASE_WAIT = 10.0
# The client gives a lease up a tenth of its length (at most 2 s) before the coordinator could.
MAX_MARGIN = 2.0
PUBLISH_WAIT = 10.0


@dataclass(frozen=True)
class PauseOrder:
    """The coordinator asks to pause: finish the unit of work, free the VRAM, then return."""

    request_id: str
    fence: int
    deadline_ms: Optional[int]
    reason: str


@dataclass(frozen=True)
class ResumeOrder:
    """The paused request holds a GPU again (maybe another one): reload, then return."""

    request_id: str
    fence: int
    gpu: str
    lease_ms: int
    reason: str


PauseHandler = Callable[[PauseOrder], Awaitable[None]]
ResumeHandler = Callable[[ResumeOrder], Awaitable[None]]


def _parse_instant(text: Optional[str]) -> Optional[float]:
    """An RFC 3339 instant (`...Z`) as Unix seconds."""
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


#: A lease's phase: `active` (renewing itself), `pausing` (its `on_pause` runs), `paused` (ACKed, waiting
#: for `resume`), `resuming` (its `on_resume` runs), then `released` or `lost` (revoked, or given up).
Phase = Literal["active", "pausing", "paused", "resuming", "released", "lost"]


class Lease:
    """A granted lease. Renewed in the background at a third of its length; `fence` is always the
    current one (a resume brings a new one); `lost` is set when it is revoked or given up."""

    def __init__(
        self,
        client: "Client",
        request_id: str,
        reply: ReplyDoc,
        queue: "asyncio.Queue[Answer]",
        early: List[Answer],
        on_pause: Optional[PauseHandler],
        on_resume: Optional[ResumeHandler],
        lease_ms: int,
    ) -> None:
        self._client = client
        self.request_id = request_id
        self.gpu: str = str(reply.get("gpu", ""))
        self.fence: int = int(reply.get("fence", 0))
        self.vram_mb: Optional[int] = reply.get("vram_mb")
        self.lease_ms: int = int(reply.get("lease_ms") or lease_ms)
        self.waited_ms: Optional[int] = reply.get("waited_ms")
        self.lost = asyncio.Event()
        self.lost_reason: Optional[str] = None
        self.phase: Phase = "active"
        self._queue = queue
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._loop = asyncio.get_running_loop()
        # When the oldest renewal not yet confirmed was sent: a `renewed` names no renewal, and the one
        # it answers was sent no earlier than this (as in the Rust client).
        self._renew_sent: Optional[float] = None
        self._lost_at = self._deadline_from(reply.get("expires_at"), sent=None)
        self._renewed = asyncio.Event()
        self._released = asyncio.Event()
        self._releasing = False
        self._tasks: List["asyncio.Task[None]"] = []
        for answer in early:
            self._queue.put_nowait(answer)
        self._tasks.append(asyncio.ensure_future(self._read()))
        self._tasks.append(asyncio.ensure_future(self._renew()))
        self._tasks.append(asyncio.ensure_future(self._watch()))

    # ----- what the holder reads ---------------------------------------------------------------

    def usable(self) -> bool:
        """Whether the GPU may be used now: active, and the local expiry (a margin before the
        coordinator could revoke the lease) not passed. Check it before each unit of work."""
        return self.phase == "active" and self._loop.time() < self._lost_at

    def check(self) -> None:
        """Raises `LeaseLost` (with the reason) once the lease is lost."""
        if self.lost.is_set():
            raise LeaseLost(self.lost_reason or "the lease was lost")

    # ----- the background -----------------------------------------------------------------------

    def _margin(self) -> float:
        return min(self.lease_ms / 1000 / 10, MAX_MARGIN)

    def _deadline_from(self, expires_at: Any, sent: Optional[float]) -> float:
        """The loop time at which to give the lease up: the earlier of its expiry (read on the wall
        clock) and, for a renewal, its sending plus the lease (on this process's clock; the coordinator
        handled it after it was sent), less the margin."""
        now = self._loop.time()
        candidates: List[float] = []
        expiry = _parse_instant(expires_at if isinstance(expires_at, str) else None)
        if expiry is not None:
            candidates.append(now + (expiry - time.time()))
        if sent is not None:
            candidates.append(sent + self.lease_ms / 1000)
        if not candidates:
            candidates.append(now + self.lease_ms / 1000)
        return min(candidates) - self._margin()

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.phase = "lost"
            self.lost.set()

    async def _read(self) -> None:
        while True:
            answer = await self._queue.get()
            if answer[0] == "reply":
                await self._on_reply(answer[1])
            else:
                await self._on_control(answer[1])

    async def _on_reply(self, doc: ReplyDoc) -> None:
        outcome = doc.get("outcome")
        current = doc.get("fence")
        if outcome == "rejected" and self._releasing and isinstance(current, int):
            # A stale fence's rejection names the current fence. A newer one: the coordinator resumed
            # the request before it took the release (the two crossed), so release again under it.
            # This one: the rejection is of an input sent under an older fence.
            if current > self.fence:
                self.fence = current
                await self._publish("release", {"request_id": self.request_id, "fence": self.fence})
            if current >= self.fence:
                return
        if outcome == "renewed" and doc.get("fence") in (None, self.fence):
            at = self._deadline_from(doc.get("expires_at"), self._renew_sent)
            self._lost_at = max(self._lost_at, at)
            self._renew_sent = None
            self._renewed.set()
        elif outcome == "released":
            self.phase = "released"
            self._released.set()
        elif outcome == "revoked":
            self._lose(str(doc.get("error") or "revoked"))
        elif outcome == "rejected":
            error = str(doc.get("error", ""))
            code = reject_code(doc.get("code"))
            if self._releasing and code == RejectCode.ALREADY_ENDED:
                # A renewal that crossed our own release: the lease ended as asked, nothing was lost.
                self._renewed.set()
                return
            if code in LEASE_GONE:
                self._lose(error)
            self._renewed.set()

    async def _on_control(self, doc: ControlDoc) -> None:
        action = doc.get("action")
        fence = int(doc.get("fence", 0))
        reason = str(doc.get("reason", ""))
        if action in ("pause", "resume") and self._releasing:
            return
        if action == "revoke":
            if fence >= self.fence:
                self._lose(reason or "revoked")
        elif action == "restart":
            log.warning("the coordinator asks %s to restart: %s", self.request_id, reason)
        elif action == "pause" and fence == self.fence and self.phase == "active":
            self.phase = "pausing"
            if self._on_pause is None:
                log.warning(
                    "%s was asked to pause but has no on_pause handler: it keeps the GPU until "
                    "its lease runs out, then is revoked",
                    self.request_id,
                )
                return
            order = PauseOrder(self.request_id, fence, doc.get("deadline_ms"), reason)
            try:
                await self._on_pause(order)
            except Exception:
                log.exception("on_pause of %s failed: not acknowledged", self.request_id)
                return
            self.phase = "paused"
            await self._publish("ack", {"request_id": self.request_id, "fence": fence, "action": "paused"})
        elif action == "resume" and fence > self.fence:
            self.fence = fence
            self.gpu = str(doc.get("gpu") or self.gpu)
            self.lease_ms = int(doc.get("lease_ms") or self.lease_ms)
            self._lost_at = self._deadline_from(doc.get("expires_at"), sent=None)
            self._renew_sent = None  # a renewal of the lease before the pause dates nothing now
            self.phase = "resuming"
            self._renewed.set()  # renew on the new lease's schedule
            if self._on_resume is not None:
                resume = ResumeOrder(self.request_id, fence, self.gpu, self.lease_ms, reason)
                try:
                    await self._on_resume(resume)
                except Exception:
                    log.exception("on_resume of %s failed: not acknowledged", self.request_id)
                    return
            if self.phase == "resuming":
                self.phase = "active"
            await self._publish("ack", {"request_id": self.request_id, "fence": fence, "action": "resumed"})

    async def _publish(self, kind: str, body: Doc) -> None:
        msg_id = f"{self.request_id}-{kind}-{body.get('fence')}-{secrets.token_hex(4)}"
        try:
            await self._client._transport.publish(
                kind, body, msg_id, self._loop.time() + PUBLISH_WAIT
            )
        except CoordinatorError as e:
            log.warning("%s of %s: %s", kind, self.request_id, e)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(max(self.lease_ms / 1000 / 3, 0.05))
            if self.lost.is_set() or self.phase in ("released",) or self._releasing:
                return
            if self.phase not in ("active", "resuming"):
                continue
            if self._renew_sent is None:
                self._renew_sent = self._loop.time()
            await self._publish("renew", {"request_id": self.request_id, "fence": self.fence})

    async def _watch(self) -> None:
        while not self.lost.is_set() and self.phase != "released":
            left = self._lost_at - self._loop.time()
            if left <= 0 and self.phase in ("active", "resuming"):
                # No renewal confirmed in time: stop before the coordinator could grant on, and free
                # the GPU there when it hears.
                self._lose("no renewal was confirmed in time (the coordinator is out of reach)")
                await self._publish("release", {"request_id": self.request_id, "fence": self.fence})
                return
            await asyncio.sleep(min(max(left, 0.01), 0.25))

    async def release(self) -> None:
        """Ends the lease and waits for the coordinator's `released` (at most 10 s)."""
        if self.lost.is_set() or self.phase == "released":
            return
        self._releasing = True
        await self._publish("release", {"request_id": self.request_id, "fence": self.fence})
        try:
            await asyncio.wait_for(self._released.wait(), RELEASE_WAIT)
        except asyncio.TimeoutError:
            log.warning("no `released` for %s within %.0f s", self.request_id, RELEASE_WAIT)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._client._transport.routes.unregister(self.request_id)


class _LeaseContext:
    def __init__(self, client: "Client", kwargs: dict[str, Any]) -> None:
        self._client = client
        self._kwargs = kwargs
        self._lease: Optional[Lease] = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._client.acquire(**self._kwargs)
        return self._lease

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        lease = self._lease
        if lease is None:
            return
        try:
            await lease.release()
        finally:
            await lease._stop()
        if exc_type is None and lease.lost.is_set():
            raise LeaseLost(lease.lost_reason or "the lease was lost")


class Client:
    """A connection to the coordinator for one service.

    ```python
    async with await Client.connect("nats://127.0.0.1:4222", service="chat", prefix="gpu") as client:
        async with client.lease(priority=0, vram_mb=20000, timeout_ms=30000) as lease:
            ...  # lease.gpu, lease.fence, lease.request_id; lease.lost is set on revoke
    ```
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.service = transport.service

    @staticmethod
    async def connect(url: str, service: str, prefix: str = "gpu") -> "Client":
        """Over NATS: inputs through JetStream, answers read from the output stream."""
        from ._nats import NatsTransport

        transport = await NatsTransport.connect(url, prefix, service)
        await transport.start()
        return Client(transport)

    @staticmethod
    async def connect_http(url: str, service: str, token: Optional[str] = None) -> "Client":
        """Over the coordinator's HTTP API and its Server-Sent Events control stream."""
        from ._http import HttpTransport

        transport = HttpTransport(url, service, token)
        await transport.start()
        return Client(transport)

    def lease(
        self,
        priority: int,
        vram_mb: Optional[int] = None,
        timeout_ms: int = 30_000,
        lease_ms: Optional[int] = None,
        preemptible: Optional[bool] = None,
        gpu: Optional[str] = None,
        request_id: Optional[str] = None,
        on_pause: Optional[PauseHandler] = None,
        on_resume: Optional[ResumeHandler] = None,
        pause_ms: Optional[int] = None,
        host: Optional[str] = None,
    ) -> _LeaseContext:
        """A lease as an async context manager: granted on entry, released on exit. Without `vram_mb`
        the whole GPU. Preemptible by default only with an `on_pause` handler (which must free the
        VRAM before it returns; the client then ACKs). `pause_ms`: how long pausing takes (the
        handler's time to free the VRAM), a hint the coordinator uses to choose among holders it
        would pause alike."""
        return _LeaseContext(
            self,
            dict(
                priority=priority,
                vram_mb=vram_mb,
                timeout_ms=timeout_ms,
                lease_ms=lease_ms,
                preemptible=preemptible,
                gpu=gpu,
                request_id=request_id,
                on_pause=on_pause,
                on_resume=on_resume,
                pause_ms=pause_ms,
                host=host,
            ),
        )

    async def acquire(
        self,
        priority: int,
        vram_mb: Optional[int] = None,
        timeout_ms: int = 30_000,
        lease_ms: Optional[int] = None,
        preemptible: Optional[bool] = None,
        gpu: Optional[str] = None,
        request_id: Optional[str] = None,
        on_pause: Optional[PauseHandler] = None,
        on_resume: Optional[ResumeHandler] = None,
        pause_ms: Optional[int] = None,
        host: Optional[str] = None,
    ) -> Lease:
        """Requests a GPU and waits for the grant; `release()` the lease when done. Raises
        `GrantTimeout`, `Rejected` or `Unavailable`. With node agents, `host` asks for that host's
        GPUs, and `gpu` names one as `<host>/<id>`."""
        request_id = request_id or f"{self.service}-{secrets.token_hex(8)}"
        body: Doc = {"request_id": request_id, "priority": priority, "timeout_ms": timeout_ms}
        if vram_mb is not None:
            body["vram_mb"] = vram_mb
        if lease_ms is not None:
            body["lease_ms"] = lease_ms
        body["preemptible"] = preemptible if preemptible is not None else on_pause is not None
        if gpu is not None:
            body["gpu"] = gpu
        if pause_ms is not None:
            body["pause_ms"] = pause_ms
        if host is not None:
            body["host"] = host
        routes = self._transport.routes
        queue = routes.register(request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000 + REPLY_GRACE
        early: List[Answer] = []
        try:
            await self._transport.publish("request", body, f"{request_id}-request", deadline)
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise GrantTimeout(f"no answer to {request_id} within {timeout_ms} ms")
                try:
                    answer = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    continue
                if answer[0] == "control":
                    early.append(answer)  # an order that overtook its grant
                    continue
                doc = answer[1]
                outcome = doc.get("outcome")
                if outcome == "granted":
                    return Lease(
                        self, request_id, doc, queue, early, on_pause, on_resume,
                        lease_ms or 30_000,
                    )
                error: Optional[CoordinatorError] = None
                if outcome == "timed_out":
                    error = GrantTimeout(str(doc.get("error") or f"no GPU within {timeout_ms} ms"))
                elif outcome == "rejected":
                    error = Rejected(
                        str(doc.get("error") or "rejected"), reject_code(doc.get("code"))
                    )
                elif outcome in ("released", "cancelled", "revoked"):
                    error = CoordinatorError(f"request {request_id} has already ended ({outcome})")
                if error is not None:
                    error.answered = True
                    raise error
        except BaseException as e:  # noqa: B036 - cancellation too: the request is withdrawn
            routes.unregister(request_id)
            if not (isinstance(e, CoordinatorError) and e.answered):
                # Given up here (cancelled, no answer, not sent): withdraw it, so that it is not
                # granted to nobody.
                await self._withdraw(request_id)
            raise

    async def _withdraw(self, request_id: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.shield(
                self._transport.publish(
                    "cancel",
                    {"request_id": request_id},
                    f"{request_id}-cancel",
                    loop.time() + 2.0,
                )
            )
        except BaseException:
            pass

    async def status(self) -> StatusDoc:
        """The coordinator's status document."""
        try:
            return await self._transport.status()
        except Exception as e:
            raise Unavailable(f"status: {e}") from e

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()
