"""A blocking wrapper, for code that is not async: the client runs on an event loop in a thread of its
own, and handlers are plain functions (run in a worker thread).

```python
from gpu_coordinator.sync import Client

client = Client.connect("nats://127.0.0.1:4222", service="transcriber")
with client.lease(priority=2, vram_mb=8000, on_pause=free_vram, on_resume=reload) as lease:
    while work_left() and lease.usable():
        do_one_chunk()
client.close()
```
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Callable, Coroutine, Optional, Type, TypeVar

from . import _client
from ._client import PauseOrder, ResumeOrder
from .documents import StatusDoc

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: "Future[T]" = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class Lease:
    """A granted lease (see `gpu_coordinator.Lease`), read from any thread."""

    def __init__(self, inner: _client.Lease, loop: _Loop) -> None:
        self._inner = inner
        self._loop = loop

    @property
    def request_id(self) -> str:
        return self._inner.request_id

    @property
    def gpu(self) -> str:
        return self._inner.gpu

    @property
    def fence(self) -> int:
        return self._inner.fence

    @property
    def vram_mb(self) -> Optional[int]:
        return self._inner.vram_mb

    @property
    def lost_reason(self) -> Optional[str]:
        return self._inner.lost_reason

    def is_lost(self) -> bool:
        return self._inner.lost.is_set()

    def usable(self) -> bool:
        """Whether the GPU may be used now; check it before each unit of work."""
        return self._inner.usable()

    def check(self) -> None:
        """Raises `LeaseLost` once the lease is lost."""
        self._inner.check()


class _LeaseContext:
    """The async lease context (`gpu_coordinator.Client.lease`), entered and left on the client's loop."""

    def __init__(self, inner: _client._LeaseContext, loop: _Loop) -> None:
        self._inner = inner
        self._loop = loop

    def __enter__(self) -> Lease:
        return Lease(self._loop.run(self._inner.__aenter__()), self._loop)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._loop.run(self._inner.__aexit__(exc_type, exc, tb))


def _in_thread(handler: Optional[Callable[[T], None]]) -> Optional[Callable[[T], Coroutine[Any, Any, None]]]:
    if handler is None:
        return None
    call = handler

    async def run(order: T) -> None:
        await asyncio.get_running_loop().run_in_executor(None, call, order)

    return run


class Client:
    """The blocking client: the same API as `gpu_coordinator.Client`, without `await`."""

    def __init__(self, inner: _client.Client, loop: _Loop) -> None:
        self._inner = inner
        self._loop = loop

    @staticmethod
    def connect(url: str, service: str, prefix: str = "gpu") -> "Client":
        return Client._started(lambda: _client.Client.connect(url, service, prefix))

    @staticmethod
    def connect_http(url: str, service: str, token: Optional[str] = None) -> "Client":
        return Client._started(lambda: _client.Client.connect_http(url, service, token))

    @staticmethod
    def _started(connect: Callable[[], Coroutine[Any, Any, _client.Client]]) -> "Client":
        """A client connected by `connect` on a loop of its own (stopped again if that fails)."""
        loop = _Loop()
        try:
            inner = loop.run(connect())
        except BaseException:
            loop.stop()
            raise
        return Client(inner, loop)

    def lease(
        self,
        priority: int,
        vram_mb: Optional[int] = None,
        timeout_ms: int = 30_000,
        lease_ms: Optional[int] = None,
        preemptible: Optional[bool] = None,
        gpu: Optional[str] = None,
        request_id: Optional[str] = None,
        on_pause: Optional[Callable[[PauseOrder], None]] = None,
        on_resume: Optional[Callable[[ResumeOrder], None]] = None,
        pause_ms: Optional[int] = None,
        host: Optional[str] = None,
    ) -> _LeaseContext:
        inner = self._inner.lease(
            priority,
            vram_mb=vram_mb,
            timeout_ms=timeout_ms,
            lease_ms=lease_ms,
            preemptible=preemptible,
            gpu=gpu,
            request_id=request_id,
            on_pause=_in_thread(on_pause),
            on_resume=_in_thread(on_resume),
            pause_ms=pause_ms,
            host=host,
        )
        return _LeaseContext(inner, self._loop)

    def status(self) -> StatusDoc:
        return self._loop.run(self._inner.status())

    def close(self) -> None:
        try:
            self._loop.run(self._inner.close())
        finally:
            self._loop.stop()
