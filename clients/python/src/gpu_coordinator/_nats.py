"""The NATS transport: inputs published to the input stream (JetStream, deduplicated by message id),
replies and control orders read through JetStream consumers on the output stream, so that a NATS
restart or a reconnect loses none of them.

Two pull consumers, one on `<prefix>.reply.<svc>` and one on `<prefix>.control.<svc>` (nats-server 2.9
takes one filter per consumer), each starting at the output stream's next message when the client
starts. Each remembers the stream sequence of the last message it handed on, and after every reconnect,
failure or gap in its consumer sequence it makes a new consumer that starts right after it: nothing is
lost, nothing handed on twice.

The consumers are made by the coordinator, asked on `<prefix>.reader.<svc>`: with per-service NATS
permissions a service may not make consumers (a consumer's deliver subject could push the stream onto
another service's subjects, and permissions cannot check it). When no coordinator answers that subject
the client makes the consumer itself, which works where NATS has no per-service permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any, List, Optional
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._transport import Doc, Routes, Transport
from .documents import ReplyDoc, StatusDoc
from .errors import Unavailable

log = logging.getLogger("gpu_coordinator")

INACTIVE_THRESHOLD = 60.0
FETCH_WAIT = 1.0
BACKOFF_MAX = 5.0
READY_WAIT = 15.0


def stream_base(prefix: str) -> str:
    """`gpu` -> `GPU`, `a.b-c` -> `A_B_C`: the streams are `<BASE>_INPUT` and `<BASE>_OUTPUT`."""
    return "".join("_" if c in "-." else c.upper() for c in prefix)


class _Reader:
    """One consumer on the output stream, filtered to one subject, made anew when it fails."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        kind: str,
        routes: Routes,
        start: int,
        service: str,
        nc: NatsClient,
        reader_subject: str,
    ) -> None:
        self.js, self.stream, self.subject, self.kind = js, stream, subject, kind
        self.nc, self.reader_subject = nc, reader_subject
        self.routes = routes
        self.next = start
        self.service = service
        self.ready = asyncio.Event()
        self.reset = asyncio.Event()
        self.task: Optional["asyncio.Task[None]"] = None
        self.name: Optional[str] = None
        self.error: Optional[Exception] = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _open(self) -> Any:
        self.name = await self._ask_coordinator()
        if self.name is None:
            await self._make()
        return await self.js.pull_subscribe_bind(consumer=self.name, stream=self.stream)

    async def _ask_coordinator(self) -> Optional[str]:
        """The name of the consumer a coordinator made, or None when none answers."""
        ask = json.dumps({"topic": self.kind, "start_seq": self.next}).encode()
        try:
            msg = await self.nc.request(self.reader_subject, ask, timeout=READY_WAIT / 3)
        except nats.errors.NoRespondersError:
            return None
        answer = json.loads(msg.data)
        if not isinstance(answer, dict) or not answer.get("consumer"):
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise Unavailable(f"the coordinator made no reader on {self.reader_subject}: {error}")
        return str(answer["consumer"])

    async def _make(self) -> None:
        self.name = f"{self.service}-{self.kind}-{secrets.token_hex(6)}"
        config = ConsumerConfig(
            name=self.name,
            filter_subject=self.subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=INACTIVE_THRESHOLD,
        )
        await self.js.add_consumer(self.stream, config)

    async def _close(self, sub: Any) -> None:
        try:
            if sub is not None:
                await sub.unsubscribe()
            if self.name is not None:
                await self.js.delete_consumer(self.stream, self.name)
        except Exception:  # the server may be away: the consumer then goes by inactivity
            pass

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            sub = None
            try:
                self.reset.clear()
                sub = await self._open()
                self.ready.set()
                backoff = 0.1
                consumer_seq = 0
                while not self.reset.is_set():
                    try:
                        msgs = await sub.fetch(64, timeout=FETCH_WAIT)
                    except nats.errors.TimeoutError:
                        continue
                    for msg in msgs:
                        meta = msg.metadata
                        if meta.sequence.consumer != consumer_seq + 1:
                            # A delivery was lost: read again from the last handed on.
                            self.reset.set()
                            break
                        consumer_seq = meta.sequence.consumer
                        if meta.sequence.stream < self.next:
                            continue
                        self.next = meta.sequence.stream + 1
                        try:
                            doc = json.loads(msg.data)
                        except ValueError:
                            continue
                        if isinstance(doc, dict):
                            self.routes.route(self.kind, doc)
            except asyncio.CancelledError:
                await self._close(sub)
                raise
            except Exception as e:
                self.error = e
                log.debug("reader of %s: %s; opening it again", self.subject, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            await self._close(sub)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass


class NatsTransport(Transport):
    def __init__(self, nc: NatsClient, prefix: str, service: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.service = service
        self.routes = Routes()
        self.output = f"{stream_base(prefix)}_OUTPUT"
        self.readers: List[_Reader] = []

    @staticmethod
    async def connect(url: str, prefix: str, service: str) -> "NatsTransport":
        user = urlsplit(url.split(",")[0]).username
        holder: List[NatsTransport] = []

        async def reconnected() -> None:
            # Deliveries to a pull request in flight across the reconnect may be lost.
            for transport in holder:
                for reader in transport.readers:
                    reader.reset.set()

        async def quiet(_: Exception) -> None:
            return None

        options: dict[str, Any] = dict(
            servers=url.split(","),
            name=f"gpu-coordinator-python {service}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            reconnected_cb=reconnected,
            error_cb=quiet,
        )
        if user:
            # Replies to this user's requests come on its own inbox prefix (see the coordinator's
            # `nats-auth`).
            options["inbox_prefix"] = f"_INBOX_{user}"
        try:
            nc = await nats.connect(**options)
        except Exception as e:
            raise Unavailable(f"cannot connect to NATS at {_redact(url)}: {e}") from e
        transport = NatsTransport(nc, prefix, service)
        holder.append(transport)
        return transport

    async def start(self) -> None:
        try:
            info = await self.js.stream_info(self.output)
        except Exception as e:
            raise Unavailable(
                f"the coordinator's output stream {self.output} cannot be read: {e}"
            ) from e
        start = info.state.last_seq + 1
        for kind in ("reply", "control"):
            reader = _Reader(
                self.js,
                self.output,
                f"{self.prefix}.{kind}.{self.service}",
                kind,
                self.routes,
                start,
                self.service,
                self.nc,
                f"{self.prefix}.reader.{self.service}",
            )
            reader.start()
            self.readers.append(reader)
        for reader in self.readers:
            try:
                await asyncio.wait_for(reader.ready.wait(), timeout=READY_WAIT)
            except asyncio.TimeoutError:
                await self.close()
                raise Unavailable(
                    f"cannot read {reader.subject} from {self.output} (are the credentials "
                    f"this service's?): {reader.error or 'no answer'}"
                ) from None

    async def publish(
        self, kind: str, body: Doc, msg_id: str, deadline: float
    ) -> Optional[ReplyDoc]:
        subject = f"{self.prefix}.{kind}.{self.service}"
        payload = json.dumps(body).encode()
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            left = deadline - loop.time()
            try:
                await self.js.publish(
                    subject,
                    payload,
                    timeout=max(0.5, min(5.0, left)),
                    headers={"Nats-Msg-Id": msg_id},
                )
                return None
            except Exception as e:
                if loop.time() + backoff >= deadline:
                    raise Unavailable(f"publishing to {subject} failed: {e}") from e
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def status(self) -> StatusDoc:
        msg = await self.nc.request(f"{self.prefix}.status", b"", timeout=5)
        doc: StatusDoc = json.loads(msg.data)
        return doc

    async def close(self) -> None:
        for reader in self.readers:
            await reader.stop()
        try:
            await self.nc.drain()
        except Exception:
            pass


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://***@{host}"
    return url
