"""What the client needs from a way to reach the coordinator (NATS or HTTP): publish an input, and get
the replies and control orders about a request, in the coordinator's order per kind."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Literal, Optional, Protocol, Tuple, Union, cast

from .documents import ControlDoc, ReplyDoc, StatusDoc

#: A JSON object: an input the client sends, or a document not yet told apart.
Doc = Dict[str, Any]
#: An answer about a request: its reply, or an order for it.
Answer = Union[Tuple[Literal["reply"], ReplyDoc], Tuple[Literal["control"], ControlDoc]]


class Routes:
    """The queues of the requests this client waits on or holds, by request id."""

    def __init__(self) -> None:
        self._queues: Dict[str, "asyncio.Queue[Answer]"] = {}

    def register(self, request_id: str) -> "asyncio.Queue[Answer]":
        queue: "asyncio.Queue[Answer]" = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def route(self, kind: str, doc: Doc) -> None:
        """Hands an answer to the request it names; drops it when nobody here waits for it."""
        request_id = doc.get("request_id")
        if isinstance(request_id, str):
            queue = self._queues.get(request_id)
            if queue is not None:
                # What the coordinator wrote on the subject (or stream) of `kind`: taken for its
                # document as it is, like the JSON it came as.
                queue.put_nowait(cast(Answer, (kind, doc)))


class Transport(Protocol):
    """A way to reach the coordinator (NATS, HTTP, or a test's fake). Answers reach `routes`; `publish`
    may answer directly too."""

    service: str
    routes: Routes

    async def start(self) -> None:
        """Opens the readers; returns once every answer to an input sent from now on will be seen."""
        ...

    async def publish(
        self, kind: str, body: Doc, msg_id: str, deadline: float
    ) -> Optional[ReplyDoc]:
        """Sends an input of `kind` (`request`, `release`, `renew`, `ack`, `cancel`) until it is stored
        or `deadline` (the event loop's clock) passes. Answers the reply when the transport gets it in
        return (HTTP); the reply is routed as well."""
        ...

    async def status(self) -> StatusDoc:
        """The status document."""
        ...

    async def close(self) -> None:
        """Closes the readers and the connection."""
        ...
