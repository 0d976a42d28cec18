"""The HTTP transport: inputs are POSTed to the coordinator's HTTP API (a request is a long poll that
answers with the grant), and control orders are read from its Server-Sent Events stream
`GET /gpu/control/<svc>`, resumed with `Last-Event-ID` after a cut, so none is lost."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Dict, Optional, cast

import httpx

from ._transport import Doc, Routes, Transport
from .documents import ReplyDoc, StatusDoc
from .errors import Rejected, Unavailable, reject_code

log = logging.getLogger("gpu_coordinator")

BACKOFF_MAX = 2.0


class HttpTransport(Transport):
    def __init__(self, base_url: str, service: str, token: Optional[str]) -> None:
        self.base = base_url.rstrip("/")
        self.service = service
        self.routes = Routes()
        headers: Dict[str, str] = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0, read=None))
        self.last_event_id: Optional[str] = None
        self.ready = asyncio.Event()
        self.task: Optional["asyncio.Task[None]"] = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self._control())
        try:
            await asyncio.wait_for(self.ready.wait(), timeout=30)
        except asyncio.TimeoutError as e:
            raise Unavailable(f"the coordinator at {self.base} does not answer") from e

    async def _control(self) -> None:
        backoff = 0.1
        url = f"{self.base}/gpu/control/{self.service}"
        while True:
            try:
                headers = {"Accept": "text/event-stream"}
                if self.last_event_id is not None:
                    headers["Last-Event-ID"] = self.last_event_id
                async with self.http.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        raise Unavailable(f"GET {url}: HTTP {response.status_code}")
                    self.ready.set()
                    backoff = 0.1
                    event: Dict[str, str] = {}
                    async for line in response.aiter_lines():
                        if line == "":
                            self._dispatch(event)
                            event = {}
                        elif not line.startswith(":") and ":" in line:
                            field, value = line.split(":", 1)
                            value = value[1:] if value.startswith(" ") else value
                            event[field] = event.get(field, "") + value if field == "data" else value
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("control stream: %s; opening it again", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _dispatch(self, event: Dict[str, str]) -> None:
        if "id" in event:
            self.last_event_id = event["id"]
        data = event.get("data")
        if not data:
            return
        try:
            doc = json.loads(data)
        except ValueError:
            return
        if isinstance(doc, dict):
            self.routes.route("control", doc)

    async def publish(
        self, kind: str, body: Doc, msg_id: str, deadline: float
    ) -> Optional[ReplyDoc]:
        url = f"{self.base}/gpu/{kind}"
        payload = dict(body, service_id=self.service)
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            try:
                response = await self.http.post(url, json=payload)
            except httpx.HTTPError as e:
                if loop.time() + backoff >= deadline:
                    raise Unavailable(f"POST {url}: {e}") from e
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            doc: Any = _json(response)
            if response.status_code == 503:
                if loop.time() + backoff >= deadline:
                    raise Unavailable(f"POST {url}: {doc.get('error', 'unavailable')}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if "outcome" in doc:
                self.routes.route("reply", doc)
                if kind == "request" and doc["outcome"] in ("queued", "paused"):
                    continue  # still waiting: the same request id waits on
                return cast(ReplyDoc, dict(doc))
            if kind == "request" and response.status_code == 202:
                continue  # past the longest a call waits: POST it again to wait on
            if response.status_code >= 400:
                raise Rejected(
                    str(doc.get("error", f"HTTP {response.status_code}")),
                    reject_code(doc.get("code")),
                )
            return None

    async def status(self) -> StatusDoc:
        response = await self.http.get(f"{self.base}/gpu/status")
        return cast(StatusDoc, dict(_json(response)))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self.http.aclose()


def _json(response: httpx.Response) -> Dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        return {"error": response.text}
    return doc if isinstance(doc, dict) else {"error": str(doc)}
