#!/usr/bin/env python3
"""Engine sidecars on a real GPU: a background engine put to sleep for a chat, measured with NVML.

`story` (the default) starts two engines on cuda:0 that speak vLLM's sleep API, sized so that they do NOT
fit together (chat 60%, background 50% of the card), each started then put to sleep in turn (the second
could not start beside the first: vLLM checks the free memory at start too); then `gpu-coordinator serve
--embedded` with `[nvml] enabled`, no `[[gpus]]` (NVML's), ack_deadline_ms 30000, and an `[[engines]]`
sidecar (kind "vllm") before each: chat priority 0 want "on_request" idle_ms 3000, background priority 2
want "always". Once the background is awake (GET /gpu/engines), one streamed chat completion goes through
the chat sidecar while a thread samples NVML every 20 ms (the card's used memory and each engine's
processes'). Printed, as a markdown table for BENCHMARKS.md with the GPU and driver: the background's
sleep and the chat's wake (last_sleep_ms, last_wake_ms), the chat's time to first chunk through the
sidecar, when NVML saw the background's memory freed and the chat's allocated, the peak, and the time
from the chat's end until the background is awake again (idle_ms included).
Exit status 1 unless: the stream answered 200 with chunks and `data: [DONE]`; the background slept and
the chat woke; peak used <= the card; the background's processes dropped half its size BEFORE the
chat's rose by half of theirs (from the card's total where NVML lists no memory for our PIDs, as in
some containers); no engine logged "out of memory"; the background was awake again within
--resume-timeout; the coordinator kept running. Logs are printed and kept when a check fails.

`engine` is the toy engine (http.server + torch) on one port: GET /health; GET /is_sleeping ->
{"is_sleeping": bool}, true only once the memory is freed; POST /sleep?level=1 answers 200 at once
while a thread waits for the completions in flight, copies the weights (--weights-mb of its --mb) to
pinned host memory, drops the rest as vLLM drops its KV cache, and empties PyTorch's cache; POST
/wake_up allocates again (500 if CUDA runs out of memory); POST /v1/completions runs a 512x512 fp16
matmul per token, OpenAI-style, and with "stream": true answers SSE `data: {...}` then `data: [DONE]`.
With --model (and vLLM installed) the story runs `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --host
127.0.0.1 --port P --enable-sleep-mode --gpu-memory-utilization F` instead, as docs/engines.md says.

Needs one NVIDIA GPU, Python 3.9+, PyTorch with CUDA, `pip install nvidia-ml-py`, and the binary:
    cargo build --release && python3 scripts/gpu_engines.py [--binary target/release/gpu-coordinator]
    python3 scripts/gpu_engines.py engine --port 8001 --mb 4096       # the toy engine alone
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

MB = 1024 * 1024
SIDE = 512  # the matmul of a token: SIDE x SIDE fp16, read from the weights' first bytes


def engine(args: argparse.Namespace) -> None:
    try:
        import torch  # only here: the story and --help run without it
    except ImportError:
        raise SystemExit("the toy engine needs PyTorch with CUDA (pip install torch)")

    torch.cuda.set_device(0)
    weights_mb = max(1, min(args.weights_mb or args.mb, args.mb))

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    class Toy:
        def __init__(self) -> None:
            self.lock = threading.Condition()
            self.weights = self.cache = self.host = None  # type: Any
            self.sleeping, self.sleep_ordered, self.busy = True, False, 0
            self.wake()

        def wake(self) -> None:
            with self.lock:
                if not self.sleeping:
                    return
                try:
                    w = torch.empty(weights_mb * MB, dtype=torch.uint8, device="cuda:0")
                    w.fill_(1) if self.host is None else w.copy_(self.host)
                    cache = torch.ones((args.mb - weights_mb) * MB, dtype=torch.uint8, device="cuda:0")
                    torch.cuda.synchronize()
                except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
                    w = cache = None
                    torch.cuda.empty_cache()
                    say(f"wake failed: {e}")
                    raise
                self.weights, self.cache, self.host, self.sleeping = w, cache, None, False
                say(f"awake: {args.mb} MB on cuda:0")

        def sleep(self) -> None:
            with self.lock:
                if self.sleeping or self.sleep_ordered:
                    return
                self.sleep_ordered = True
            threading.Thread(target=self.offload, daemon=True).start()

        def offload(self) -> None:
            with self.lock:
                self.lock.wait_for(lambda: self.busy == 0)  # completions in flight use the weights
                try:
                    host = torch.empty(weights_mb * MB, dtype=torch.uint8, pin_memory=True)
                except RuntimeError:
                    host = torch.empty(weights_mb * MB, dtype=torch.uint8)
                host.copy_(self.weights)
                self.host, self.weights, self.cache = host, None, None
                torch.cuda.empty_cache()
                self.sleeping, self.sleep_ordered = True, False
                say("asleep: the memory is freed")

        def token(self, i: int) -> str:
            a = self.weights[: 2 * SIDE * SIDE].view(torch.float16).view(SIDE, SIDE)
            return f" t{i}:{float((a @ a).float().abs().sum()):.3g}"

    toy = Toy()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def body(self) -> bytes:
            if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            out, size = b"", 1
            while size:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                out += self.rfile.read(size)
                self.rfile.readline()  # the chunk's CRLF, or the blank line after the last chunk
            return out

        def send(self, code: int, doc: object) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in ("/health", "/is_sleeping"):
                self.send(200, {"is_sleeping": toy.sleeping})
            else:
                self.send(404, {"error": f"no {path}"})

        def do_POST(self) -> None:
            raw, path = self.body(), self.path.split("?")[0]
            if path == "/sleep":
                toy.sleep()
                self.send(200, {})
            elif path == "/wake_up":
                try:
                    toy.wake()
                    self.send(200, {})
                except RuntimeError as e:
                    self.send(500, {"error": str(e)[:300]})
            elif path == "/v1/completions":
                with toy.lock:
                    if toy.sleeping or toy.sleep_ordered:
                        return self.send(503, {"error": "the engine sleeps"})
                    toy.busy += 1
                try:
                    self.complete(json.loads(raw or b"{}"))
                finally:
                    with toy.lock:
                        toy.busy -= 1
                        toy.lock.notify_all()
            else:
                self.send(404, {"error": f"no {path}"})

        def complete(self, req: Dict[str, Any]) -> None:
            n = int(req.get("max_tokens") or 16)
            base = {"id": "cmpl-toy", "object": "text_completion", "created": int(time.time()),
                    "model": req.get("model", "toy")}

            def doc(text: str, last: bool) -> Dict[str, Any]:
                return dict(base, choices=[{"index": 0, "text": text, "logprobs": None,
                                            "finish_reason": "length" if last else None}])

            if not req.get("stream"):
                usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                return self.send(200, dict(doc("".join(toy.token(i) for i in range(n)), True), usage=usage))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in itertools.chain((json.dumps(doc(toy.token(i), i == n - 1)) for i in range(n)), ["[DONE]"]):
                data = f"data: {event}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    say(f"toy engine on {args.host}:{args.port}")
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def get_json(url: str) -> Any:
    return json.loads(get(url))


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=300).read()


def wait_until(what: str, cond, within: float, alive: List[Tuple[str, subprocess.Popen]]) -> float:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if cond():
                return time.monotonic()
        except (OSError, ValueError, KeyError):  # not listening yet, not JSON yet, not listed yet
            pass
        for name, proc in alive:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.02)
    raise SystemExit(f"timed out after {within:.0f} s waiting for {what}")


def family(pid: int) -> Set[int]:
    """`pid` and its descendants (vLLM computes in a child process)."""
    kids: Dict[int, List[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            kids.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(kids.get(p, []))
    return out


Sample = Tuple[float, int, Dict[int, int]]  # monotonic time, MB used on the card, MB used per PID


def sample_nvml(handle: Any, total_mb: int, samples: List[Sample], stop: threading.Event) -> None:
    import pynvml

    while not stop.is_set():
        t, used, procs = time.monotonic(), int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // MB, {}
        try:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.usedGpuMemory is not None and p.usedGpuMemory // MB <= total_mb:
                    procs[p.pid] = procs.get(p.pid, 0) + int(p.usedGpuMemory) // MB
        except pynvml.NVMLError:
            pass
        samples.append((t, used, procs))
        time.sleep(0.02)


def stream_chat(port: int, model: str) -> Dict[str, Any]:
    """One streamed completion: when it was sent, its first `data:` line and its end came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": model, "prompt": "Hello, GPU", "max_tokens": 32, "stream": True})
    out: Dict[str, Any] = {"sent": time.monotonic(), "first": None, "chunks": 0, "done": False, "error": ""}
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out["status"] = resp.status
    if resp.status != 200:
        out["error"] = resp.read()[:300].decode(errors="replace")
    while resp.status == 200:
        line = resp.readline()
        if not line or line.strip() == b"data: [DONE]":
            out["done"] = bool(line)
            break
        if line.startswith(b"data: "):
            out["first"] = out["first"] or time.monotonic()
            out["chunks"] += 1
    out["end"] = time.monotonic()
    conn.close()
    return out


def order(samples: List[Sample], since: float, bg: Set[int], chat: Set[int], bg_mb: int,
          chat_mb: int) -> Tuple[Optional[float], Optional[float], str]:
    """When, after `since`, the background's memory fell by half its size and the chat's rose by half its own."""
    def of(procs: Dict[int, int], pids: Set[int]) -> Optional[int]:
        seen = [procs[p] for p in pids if p in procs]
        return sum(seen) if seen else None

    before, after = [s for s in samples if s[0] < since][-1:], [s for s in samples if s[0] >= since]
    if not before:
        return None, None, "no sample before the request"
    if any(of(p, bg) is not None and of(p, chat) is not None for _, _, p in samples):
        bg0, chat0 = of(before[0][2], bg) or 0, of(before[0][2], chat) or 0
        freed = next((t for t, _, p in after if p and (of(p, bg) or 0) <= bg0 - bg_mb / 2), None)
        rose = next((t for t, _, p in after if (of(p, chat) or 0) >= chat0 + chat_mb / 2), None)
        return freed, rose, "per process"
    freed = next((t for t, u, _ in after if u <= before[0][1] - bg_mb / 2), None)
    low, rose = before[0][1], None
    for t, u, _ in after:
        low = min(low, u)
        if freed is not None and t > freed and u >= low + chat_mb / 2:
            rose = t
            break
    return freed, rose, "the card's total: NVML lists no memory for our PIDs"


def stop_all(procs: List[Tuple[str, subprocess.Popen]]) -> None:
    """The coordinator first (SIGTERM), then each engine's process group (vLLM has children)."""
    for name, proc in reversed(procs):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                proc.send_signal(sig) if name == "the coordinator" else os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def story(args: argparse.Namespace) -> None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        raise SystemExit("the story samples NVML through pynvml: pip install nvidia-ml-py")
    binary, vllm = Path(args.binary), bool(args.model)
    if not binary.exists():
        raise SystemExit(f"no {binary}: cargo build --release, or pass --binary")
    if vllm and not shutil.which("vllm"):
        raise SystemExit("--model needs vLLM (`vllm` on the PATH)")
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731 (bytes from old pynvml)
    name, driver = text(pynvml.nvmlDeviceGetName(handle)), text(pynvml.nvmlSystemGetDriverVersion())
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    total_mb, used_mb = int(memory.total) // MB, int(memory.used) // MB
    chat_mb, bg_mb = int(total_mb * args.chat_fraction), int(total_mb * args.background_fraction)
    if chat_mb + bg_mb <= total_mb:
        raise SystemExit(f"chat {chat_mb} + background {bg_mb} MB fit in {total_mb} MB: raise the fractions")
    if used_mb + max(chat_mb, bg_mb) + 2048 > total_mb:
        raise SystemExit(f"{used_mb} MB of {total_mb} MB are already used on {name}: free the GPU first")
    kind = f"vLLM {args.model}" if vllm else "toy engines (scripts/gpu_engines.py engine)"
    print(f"{name}, driver {driver}: {total_mb} MB, {used_mb} MB used; chat {chat_mb} MB, "
          f"background {bg_mb} MB; {kind}")
    work = Path(tempfile.mkdtemp(prefix="gpu-engines-"))
    ports = {k: free_port() for k in ("http", "chat", "chat_engine", "background", "background_engine")}
    procs: List[Tuple[str, subprocess.Popen]] = []
    stop, samples, ok = threading.Event(), [], False  # type: threading.Event, List[Sample], bool
    try:
        for service, mb, fraction in (("chat", chat_mb, args.chat_fraction),
                                      ("background", bg_mb, args.background_fraction)):
            port, started = ports[f"{service}_engine"], time.monotonic()
            if vllm:
                argv = ["vllm", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
                        "--enable-sleep-mode", "--gpu-memory-utilization", f"{fraction:.2f}",
                        *shlex.split(args.vllm_args)]
            else:
                argv = [sys.executable, os.path.abspath(__file__), "engine", "--port", str(port),
                        "--mb", str(mb), "--weights-mb", str(min(mb, args.weights_mb))]
            procs.append((f"the {service} engine", subprocess.Popen(
                argv, stdout=open(work / f"{service}-engine.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(os.environ, VLLM_SERVER_DEV_MODE="1"))))
            base = f"http://127.0.0.1:{port}"
            up = wait_until(f"the {service} engine's /health", lambda: get(base + "/health") is not None,
                            args.start_timeout, procs)
            post(base + "/sleep?level=1")  # so that the next engine fits; its sidecar wakes it
            wait_until(f"the {service} engine asleep", lambda: get_json(base + "/is_sleeping")["is_sleeping"],
                       120, procs)
            print(f"{service} engine up on :{port} after {up - started:.0f} s, put to sleep")
        (work / "coordinator.toml").write_text(
            f'[http]\nlisten = "127.0.0.1:{ports["http"]}"\n\n[preemption]\nack_deadline_ms = 30000\n\n'
            f"[nvml]\nenabled = true\nsample_ms = 100\nsettle_ms = 10000\n\n" + "".join(
                f'[[engines]]\nservice = "{service}"\nkind = "vllm"\nlisten = "127.0.0.1:{ports[service]}"\n'
                f'upstream = "http://127.0.0.1:{ports[service + "_engine"]}"\npriority = {priority}\n'
                f"vram_mb = {mb}\nmax_wait_ms = 120000\nsleep_level = 1\n{want}\n"
                for service, priority, mb, want in (
                    ("chat", 0, chat_mb, 'want = "on_request"\nidle_ms = 3000\n'),
                    ("background", 2, bg_mb, 'want = "always"\n'))))
        coordinator = subprocess.Popen(
            [str(binary), "serve", "--embedded", "--data-dir", str(work / "data"), "--config",
             str(work / "coordinator.toml")], stdout=subprocess.DEVNULL, stderr=open(work / "coordinator.log", "wb"))
        procs.append(("the coordinator", coordinator))

        def engines() -> Dict[str, Any]:
            return {e["service"]: e for e in get_json(f"http://127.0.0.1:{ports['http']}/gpu/engines")}

        def background_awake(after: int) -> bool:
            bg = engines()["background"]
            return bool(bg["state"] == "awake" and bg["wakes"] > after)

        wait_until("the background engine awake", lambda: background_awake(0), 300, procs)
        chat_pids, bg_pids = family(procs[0][1].pid), family(procs[1][1].pid)
        before = engines()
        threading.Thread(target=sample_nvml, args=(handle, total_mb, samples, stop), daemon=True).start()
        time.sleep(1)  # a baseline: the background awake, the chat asleep
        print("background awake; a streamed chat completion goes through the chat sidecar")
        chat = stream_chat(ports["chat"], args.model or "toy")
        after, back = engines(), None
        if chat["status"] == 200:
            try:
                back = wait_until("the background awake again", lambda: background_awake(
                    before["background"]["wakes"]), args.resume_timeout, procs)
            except SystemExit as e:
                print(e, file=sys.stderr)
        time.sleep(0.5)
        stop.set()
        last, sent = engines(), chat["sent"]
        freed, rose, judged = order(samples, sent, bg_pids, chat_pids, bg_mb, chat_mb)
        peak = max(u for _, u, _ in samples)
        oom = [n for n in ("chat", "background")
               if "out of memory" in (work / f"{n}-engine.log").read_text(errors="replace").lower()]
        ms = lambda t: f"{(t - sent) * 1000:,.0f} ms" if t else "never"  # noqa: E731
        in_order = bool(freed and rose and freed < rose)
        checks = [
            ("the stream answered 200 with chunks and [DONE]", chat["status"] == 200 and chat["done"]
             and chat["chunks"] > 0, f"HTTP {chat['status']} {chat['error']}"),
            ("the background slept and the chat woke", after["background"]["sleeps"] > before["background"]["sleeps"]
             and after["chat"]["wakes"] > before["chat"]["wakes"], json.dumps(after)),
            ("peak VRAM used <= the card", peak <= total_mb, f"{peak} of {total_mb} MB"),
            ("the background's memory freed before the chat's allocated", in_order,
             f"freed +{ms(freed)}, chat allocated +{ms(rose)} after the request ({judged})"),
            ("no engine ran out of memory", not oom, f"out of memory in {oom}"),
            (f"the background awake again within {args.resume_timeout:.0f} s", back is not None, "see the logs"),
            ("the coordinator kept running", coordinator.poll() is None, "see coordinator.log"),
        ]
        ok = all(good for _, good, _ in checks)
        for what, good, detail in checks:
            print(f"{'ok  ' if good else 'FAIL'} {what}{'' if good else ': ' + detail}")
        fmt = lambda v: f"{v:,} ms" if v is not None else "-"  # noqa: E731
        print(f"\nEngine sidecars on {name}, driver {driver}, {kind}: chat {chat_mb:,} MB (priority 0) and "
              f"background {bg_mb:,} MB (priority 2, want always) of {total_mb:,} MB, "
              f"{time.strftime('%Y-%m-%d')}:\n\n| figure | value |\n|---|---|")
        for what, value in (
            ("background sleep: pause -> memory free (last_sleep_ms)", fmt(after["background"]["last_sleep_ms"])),
            ("chat wake: grant -> serving (last_wake_ms)", fmt(after["chat"]["last_wake_ms"])),
            ("chat time to first chunk through the sidecar (background awake)", ms(chat["first"])),
            ("NVML: background freed / chat allocated, after the request", f"+{ms(freed)} / +{ms(rose)} ({judged})"),
            ("background memory freed before the chat's allocated", "yes" if in_order else "NO"),
            ("peak VRAM used / card (NVML every 20 ms)", f"{peak:,} / {total_mb:,} MB"),
            ("chat stream end -> background awake again (idle_ms 3,000 included)",
             f"{(back - chat['end']) * 1000:,.0f} ms" if back else "never"),
            ("background wake after the chat slept (last_wake_ms)", fmt(last["background"]["last_wake_ms"])),
            ("command", "`" + " ".join(["python3 scripts/gpu_engines.py", *map(shlex.quote, sys.argv[1:])]) + "`"),
        ):
            print(f"| {what} | {value} |")
    finally:
        stop.set()
        stop_all(procs)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for log in sorted(work.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            print(f"logs kept in {work}", file=sys.stderr)
    sys.exit(0 if ok else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{story,engine}")
    s = sub.add_parser("story", help="the story (the default)")
    s.add_argument("--binary", default="target/release/gpu-coordinator", help="the built gpu-coordinator")
    s.add_argument("--chat-fraction", type=float, default=0.6, help="the chat engine's share of the card")
    s.add_argument("--background-fraction", type=float, default=0.5, help="the background engine's share")
    s.add_argument("--weights-mb", type=int, default=16384,
                   help="toy engines: MB copied to host memory on a sleep (an 8B model's bf16 weights); "
                        "the rest of each engine's memory is dropped as vLLM drops its KV cache")
    s.add_argument("--model", help="run `vllm serve MODEL` (vLLM installed) in place of the toy engines")
    s.add_argument("--vllm-args", default="", help="more `vllm serve` flags in one string, e.g. '--max-model-len 4096'")
    s.add_argument("--start-timeout", type=float, default=900, help="seconds an engine may take to start")
    s.add_argument("--resume-timeout", type=float, default=120,
                   help="seconds after the chat's end within which the background must be awake again")
    e = sub.add_parser("engine", help="the toy engine alone")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--host", default="127.0.0.1", help="keep it on loopback: the sleep API has no auth")
    e.add_argument("--mb", type=int, required=True, help="MB it holds on cuda:0 while awake")
    e.add_argument("--weights-mb", type=int, default=0, help="of those, MB copied to host on a sleep (0: all)")
    parser.epilog = "\n".join(p.format_help() for p in (s, e))
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("story", "engine", "-h", "--help"):
        argv = ["story", *argv]
    args = parser.parse_args(argv)
    engine(args) if args.command == "engine" else story(args)


if __name__ == "__main__":
    main()
