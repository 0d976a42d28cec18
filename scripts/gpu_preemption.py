#!/usr/bin/env python3
"""A real preemption on a real GPU, measured with NVML.

Starts private NATS, Redis and Postgres servers (from the binaries on the machine: `nats-server`,
`redis-server`, Postgres's `initdb`/`pg_ctl`) and `gpu-coordinator serve` with NVML on, then two PyTorch
processes on cuda:0 through the Python client:

- a background worker (priority 2) holding a model of `--background-gb` GB and computing in chunks; on
  `pause` it moves the model to the CPU and frees PyTorch's cache (`gpu_coordinator.torch.offload`),
  then the client ACKs; on `resume` it reloads;
- an urgent job (priority 0) needing `--urgent-fraction` of the card, started while the worker runs.

NVML is sampled every 20 ms throughout. The script prints: the instants of the urgent request, the
pause order, the worker's memory freed (as NVML saw it), the ACK and the grant; the real time from the
urgent request to its grant; the highest VRAM use seen against the card's size; and whether any
process ran out of memory. Exit status 0 only if the worker's memory was freed before the grant and
nothing ran out of memory.

Usage (from the repository, with `pip install ./clients/python torch nvidia-ml-py`):
    cargo build --release && python3 scripts/gpu_preemption.py [--binary target/release/gpu-coordinator]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

WORKER = r'''
import asyncio, json, sys, time, torch
from gpu_coordinator import Client
from gpu_coordinator.torch import offload, reload

url, prefix, gb = sys.argv[1], sys.argv[2], float(sys.argv[3])
def log(what, **kw): print(json.dumps(dict(at=time.time(), who="worker", what=what, **kw)), flush=True)

async def main():
    side = int((gb * 1024**3 / 4 / 8) ** 0.5)  # 8 square float32 matrices of `gb` GB in all
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(8)])
    async def on_pause(order):
        log("pause received", reason=order.reason)
        await offload(model)
        log("offloaded", reserved=torch.cuda.memory_reserved())
    async def on_resume(order):
        await reload(model, "cuda:0")
        log("reloaded", fence=order.fence)
    client = await Client.connect(url, service="background", prefix=prefix)
    async with client.lease(priority=2, vram_mb=int(gb * 1024 * 1.3), lease_ms=10000,
                            on_pause=on_pause, on_resume=on_resume) as lease:
        model.to("cuda:0")
        log("granted", fence=lease.fence)
        x = torch.randn(64, side, device="cuda:0")
        chunks, end = 0, time.time() + 40
        while time.time() < end:
            if not lease.usable():
                lease.check()
                await asyncio.sleep(0.01)
                continue
            x = torch.tanh(model(x)); torch.cuda.synchronize(); chunks += 1
            await asyncio.sleep(0)
        log("done", chunks=chunks)
    await client.close()
asyncio.run(main())
'''

URGENT = r'''
import asyncio, json, sys, time, torch
from gpu_coordinator import Client

url, prefix, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
def log(what, **kw): print(json.dumps(dict(at=time.time(), who="urgent", what=what, **kw)), flush=True)

async def main():
    client = await Client.connect(url, service="urgent", prefix=prefix)
    log("requested", vram_mb=mb)
    async with client.lease(priority=0, vram_mb=mb, timeout_ms=60000) as lease:
        log("granted", fence=lease.fence, waited_ms=lease.waited_ms)
        big = torch.empty(mb * 1024**2 * 9 // 10, dtype=torch.uint8, device="cuda:0")
        big.fill_(1); torch.cuda.synchronize()
        log("allocated", bytes=big.numel())
        time.sleep(3)
        del big; torch.cuda.empty_cache()
    log("released")
    await client.close()
asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within: float = 30) -> None:
    end = time.time() + within
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def postgres_bin() -> Path:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise SystemExit("Postgres's initdb is needed (apt-get install postgresql)")


def start_servers(work: Path) -> Tuple[List[subprocess.Popen[bytes]], Dict[str, str]]:
    procs: List[subprocess.Popen[bytes]] = []
    nats_port, redis_port, pg_port = free_port(), free_port(), free_port()
    procs.append(subprocess.Popen(
        [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(nats_port),
         "-js", "-sd", str(work / "nats")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    pg, data = postgres_bin(), work / "pg"
    as_user: List[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        work.chmod(0o755)
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(pg / "initdb"), "-U", "postgres", "-A", "trust", "-D", str(data)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*as_user, str(pg / "pg_ctl"), "-w", "-D", str(data), "-l", str(data / "log"), "-o",
                    f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data}",
                    "start"], check=True, stdout=subprocess.DEVNULL)
    for port in (nats_port, redis_port, pg_port):
        wait_port(port)
    urls = {
        "nats": f"nats://127.0.0.1:{nats_port}",
        "redis": f"redis://127.0.0.1:{redis_port}",
        "pg": f"postgres://postgres@127.0.0.1:{pg_port}/gpu",
        "pg_stop": " ".join([*as_user, str(pg / "pg_ctl"), "-m", "immediate", "-D", str(data), "stop"]),
    }
    return procs, urls


def sample_nvml(samples: List[Tuple[float, int]], stop: threading.Event) -> int:
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)

    def run() -> None:
        while not stop.is_set():
            samples.append((time.time(), int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)))
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/gpu-coordinator")
    parser.add_argument("--background-gb", type=float, default=8.0)
    parser.add_argument("--urgent-fraction", type=float, default=0.8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-preemption-"))
    procs, urls = start_servers(work)
    samples: List[Tuple[float, int]] = []
    stop = threading.Event()
    total = sample_nvml(samples, stop)
    total_mb = total // 1024**2
    config = work / "coordinator.toml"
    config.write_text(
        f'[nats]\nurl = "{urls["nats"]}"\nprefix = "gpu"\n\n[redis]\nurl = "{urls["redis"]}"\n\n'
        f'[database]\nurl = "{urls["pg"]}"\n\n[http]\nlisten = "127.0.0.1:{free_port()}"\n\n'
        f"[preemption]\nack_deadline_ms = 20000\n\n[nvml]\nenabled = true\nsample_ms = 100\n"
        f"settle_ms = 10000\n\n[[gpus]]\nid = \"0\"\nvram_mb = {total_mb}\n"
    )
    coordinator = subprocess.Popen([args.binary, "serve", "--config", str(config)],
                                   stderr=open(work / "coordinator.log", "wb"))
    events: List[Dict[str, object]] = []
    failures: List[str] = []
    try:
        time.sleep(3)
        worker = subprocess.Popen([sys.executable, "-c", WORKER, urls["nats"], "gpu",
                                   str(args.background_gb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        readers = [threading.Thread(target=collect, args=(worker, events), daemon=True)]
        readers[0].start()
        wait_for(events, "worker", "granted", 120)
        time.sleep(5)  # the worker computes
        urgent_mb = int(total_mb * args.urgent_fraction)
        urgent = subprocess.Popen([sys.executable, "-c", URGENT, urls["nats"], "gpu", str(urgent_mb)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        readers.append(threading.Thread(target=collect, args=(urgent, events), daemon=True))
        readers[1].start()
        for name, proc in (("urgent", urgent), ("worker", worker)):
            code = proc.wait(timeout=300)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if code != 0 or "out of memory" in err.lower():
                failures.append(f"{name} exited {code}: {err[-1500:]}")
        for reader in readers:
            reader.join(timeout=5)
    finally:
        stop.set()
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=30)
        for proc in procs:
            proc.kill()
        subprocess.run(urls["pg_stop"].split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report(events, samples, total, failures)


def collect(proc: subprocess.Popen[bytes], events: List[Dict[str, object]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass


def wait_for(events: List[Dict[str, object]], who: str, what: str, within: float) -> Dict[str, object]:
    end = time.time() + within
    while time.time() < end:
        for e in list(events):
            if e.get("who") == who and e.get("what") == what:
                return e
        time.sleep(0.05)
    raise SystemExit(f"{who} never reached `{what}`")


def at(events: List[Dict[str, object]], who: str, what: str) -> Optional[float]:
    for e in events:
        if e.get("who") == who and e.get("what") == what:
            return float(e["at"])  # type: ignore[arg-type]
    return None


def report(events: List[Dict[str, object]], samples: List[Tuple[float, int]], total: int,
           failures: List[str]) -> None:
    requested, granted = at(events, "urgent", "requested"), at(events, "urgent", "granted")
    paused, offloaded = at(events, "worker", "pause received"), at(events, "worker", "offloaded")
    gib = 1024**3
    before = max((u for t, u in samples if requested and t < requested), default=0)
    freed = next((t for t, u in samples if paused and t > paused and u < before - 0.5 * gib), None)
    peak = max((u for _, u in samples), default=0)
    print(f"card: {total / gib:.1f} GiB; peak VRAM used (NVML): {peak / gib:.2f} GiB")
    for label, t in (("urgent request", requested), ("pause received", paused),
                     ("worker offloaded", offloaded), ("NVML sees it freed", freed),
                     ("urgent granted", granted)):
        rel = f"+{(t - requested) * 1000:8.1f} ms" if t and requested else "   (none)"
        print(f"  {label:20} {rel}")
    if requested and granted:
        print(f"urgent request -> grant: {(granted - requested) * 1000:.1f} ms")
    ok = bool(freed and granted and freed <= granted) and not failures and peak <= total
    for failure in failures:
        print(f"FAILURE: {failure}")
    print("the worker's memory was freed before the grant, nothing ran out of memory" if ok
          else "NOT shown: see above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
