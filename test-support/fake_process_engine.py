#!/usr/bin/env python3
"""A fake inference engine that is a whole process, for the engine sidecars' `process` kind.

It takes its GPU memory from a FakeGpu (test-support/src/engines/gpu.rs) under its own pid, as a CUDA
process holds VRAM until it exits: POST {gpu}/alloc {"engine", "mb", "pid"}; it exits 1 if refused.
After --startup-ms (a model loading) it serves on 127.0.0.1:{port}:
  GET  /health                 200 {}
  POST /v1/completions         OpenAI completion; with "stream": true, SSE chunks `data: {...}`
  POST /v1/chat/completions    then `data: [DONE]`, each chunk --chunk-ms after the one before, flushed
On SIGTERM (or SIGINT) it frees its memory (POST {gpu}/free {"engine"}) and exits 0. Killed, it frees
nothing: the FakeGpu counts the memory of a process that is gone as freed, as the driver does.

Python 3 standard library only.
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def post(url, body):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gpu", required=True, help="the FakeGpu's base URL")
    parser.add_argument("--name", required=True, help="this engine's name in the GPU's ledger")
    parser.add_argument("--vram-mb", type=int, required=True)
    parser.add_argument("--startup-ms", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--chunk-ms", type=int, default=10)
    args = parser.parse_args()
    gpu = args.gpu.rstrip("/")

    def stop(signum, frame):
        try:
            post(gpu + "/free", {"engine": args.name})
        except (OSError, urllib.error.URLError):
            pass
        os._exit(0)

    # Before the allocation, so that no SIGTERM leaves memory behind.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    try:
        post(gpu + "/alloc", {"engine": args.name, "mb": args.vram_mb, "pid": os.getpid()})
    except urllib.error.HTTPError as e:
        print(f"{args.name}: out of memory: {e.read().decode(errors='replace')}", file=sys.stderr)
        sys.exit(1)
    except (OSError, urllib.error.URLError) as e:
        print(f"{args.name}: the GPU did not answer: {e}", file=sys.stderr)
        sys.exit(1)

    time.sleep(args.startup_ms / 1000)

    chunks, delay = args.chunks, args.chunk_ms / 1000

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: a streamed body ends when the connection closes.
        def log_message(self, format, *a):
            pass

        def send_json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.split("?")[0] == "/health":
                self.send_json(200, {})
            else:
                self.send_json(404, {"error": {"message": "not found", "code": 404}})

        def do_POST(self):
            path = self.path.split("?")[0]
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self.send_json(404, {"error": {"message": "not found", "code": 404}})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                body = {}
            chat = path == "/v1/chat/completions"
            model = body.get("model", args.name)
            created = int(time.time())
            ident = ("chatcmpl-" if chat else "cmpl-") + str(time.monotonic_ns())
            obj = "chat.completion" if chat else "text_completion"

            def choice(i, finish):
                text = "" if finish else f"tok{i} "
                if chat:
                    delta = {"content": text} if not finish else {}
                    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                for i in range(chunks + 1):
                    finish = "stop" if i == chunks else None
                    if not finish:
                        time.sleep(delay)
                    chunk = {"id": ident, "object": obj + (".chunk" if chat else ""), "created": created,
                             "model": model, "choices": [choice(i, finish)]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                time.sleep(delay * chunks)
                text = "".join(f"tok{i} " for i in range(chunks))
                c = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                     if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"})
                self.send_json(200, {"id": ident, "object": obj, "created": created, "model": model,
                                     "choices": [c], "usage": {"prompt_tokens": 1, "completion_tokens": chunks,
                                                               "total_tokens": chunks + 1}})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
