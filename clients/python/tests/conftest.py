"""A real coordinator for each test: `gpu-coordinator serve` (the binary in `COORDINATOR_BIN`, else
the debug build of this repository) on the shared Postgres, Redis and NATS of the machine, under names
of its own, or on a private nats-server that a test may restart."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
# The servers GPU_IT_NATS, GPU_IT_REDIS and GPU_IT_POSTGRES name: `cargo test --test python` sets them
# to the private servers it starts (as for the Rust suite). Run alone, pytest uses the servers on
# loopback's standard ports unless they are set.
NATS_URL = os.environ.get("GPU_IT_NATS") or "nats://127.0.0.1:4222"
REDIS_URL = os.environ.get("GPU_IT_REDIS") or "redis://127.0.0.1:6379"
PG_SERVER = os.environ.get("GPU_IT_POSTGRES") or "postgres://postgres@127.0.0.1:5432"
_counter = 0


def unique() -> str:
    """`<pid>_<n>_<hex>`: the shape the Rust suite's sweep of earlier runs recognises."""
    global _counter
    _counter += 1
    return f"{os.getpid()}_{_counter}_{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within: float = 20.0) -> None:
    until = time.monotonic() + within
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {within} s")


def binary() -> str:
    path = os.environ.get("COORDINATOR_BIN") or str(REPO / "target" / "debug" / "gpu-coordinator")
    if not Path(path).exists():
        raise RuntimeError(f"no coordinator binary at {path}: run `cargo build` first")
    return path


class NatsServer:
    """A private nats-server with JetStream, restartable on the same port and store."""

    def __init__(self, conf: Optional[str] = None) -> None:
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="py-nats-")
        self.conf = conf
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        conf = ["-c", self.conf] if self.conf else []
        self.process = subprocess.Popen(
            [exe, *conf, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


class Coordinator:
    """`gpu-coordinator serve` with a configuration of its own."""

    def __init__(
        self,
        nats_url: str,
        gpus: Dict[str, int],
        prefix: Optional[str] = None,
        **settings: int,
    ) -> None:
        name = unique()
        self.prefix = prefix or f"tpy-{name.replace('_', '-')}"
        self.nats_url = nats_url
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.dir = tempfile.mkdtemp(prefix="py-coordinator-")
        lines = [
            f'[nats]\nurl = "{nats_url}"\nprefix = "{self.prefix}"',
            f'[redis]\nurl = "{REDIS_URL}"\nkey_prefix = "it:py_{name}"',
            f'[database]\nurl = "{PG_SERVER}/gpu_it_py_{name}"',
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"',
            f"[lease]\ndefault_ms = {settings.get('lease_ms', 30000)}",
            f"[preemption]\nack_deadline_ms = {settings.get('ack_deadline_ms', 10000)}",
        ]
        for gpu, mb in gpus.items():
            lines.append(f'[[gpus]]\nid = "{gpu}"\nvram_mb = {mb}')
        self.config = Path(self.dir) / "coordinator.toml"
        self.config.write_text("\n\n".join(lines) + "\n")
        self.log = open(Path(self.dir) / "coordinator.log", "wb")
        self.process = subprocess.Popen(
            [binary(), "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=dict(os.environ, RUST_LOG="warn"),
        )

    async def ready(self) -> None:
        """Waits until it answers `status` over NATS and HTTP."""
        import httpx
        import nats

        until = time.monotonic() + 60
        nc = await nats.connect(self.nats_url, max_reconnect_attempts=-1)
        try:
            while time.monotonic() < until:
                try:
                    await nc.request(f"{self.prefix}.status", b"", timeout=0.5)
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"{self.http_url}/gpu/status")).status_code == 200:
                            return
                except Exception:
                    await asyncio.sleep(0.1)
            self.log.flush()
            tail = Path(self.log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the coordinator did not start within 60 s:\n{tail}")
        finally:
            await nc.close()

    async def status(self) -> Dict[str, object]:
        import httpx

        async with httpx.AsyncClient() as http:
            doc: Dict[str, object] = (await http.get(f"{self.http_url}/gpu/status")).json()
            return doc

    def holders(self, doc: Dict[str, object]) -> List[str]:
        gpus = doc.get("gpus")
        assert isinstance(gpus, list)
        return [h["request_id"] for g in gpus for h in g["holders"]]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    yield server
    server.close()


@pytest.fixture
async def coordinator_factory() -> AsyncIterator[Callable[..., "asyncio.Future[Coordinator]"]]:
    started: List[Coordinator] = []

    async def start(
        gpus: Optional[Dict[str, int]] = None,
        nats_url: str = NATS_URL,
        prefix: Optional[str] = None,
        **settings: int,
    ) -> Coordinator:
        coordinator = Coordinator(nats_url, gpus or {"0": 24000}, prefix, **settings)
        started.append(coordinator)
        await coordinator.ready()
        return coordinator

    yield start  # type: ignore[misc]
    for coordinator in started:
        coordinator.close()


def json_lines(text: str) -> List[Dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
