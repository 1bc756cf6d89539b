"""The `serve` stage: a local web page that plays a causal student's stream as it is generated.

    python -m distill serve recipes/toyworld_self_forcing.yaml [serve.port=8765] [stream.num_chunks=200]
    # then open http://127.0.0.1:8765/

The page has a prompt box: Start begins a stream of `stream.num_chunks` chunks; Switch hands the box's prompt to the
running stream, which takes it from its next chunk on (`stream.recache`: LongLive's KV re-cache). Chunks reach the
page as Server-Sent Events (`/events`, each a JSON message with the chunk's frames as PNG data URLs) and play at
`data.fps`; the page shows frames per second generated and the latency of the first chunk. One stream at a time.
The server binds loopback addresses only (127.0.0.1 or ::1): it runs your GPU for whoever reaches it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from students.streaming import stream_video

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("serve_page.html")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def png_data_url(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class LiveStream:
    """One stream at a time: `start(prompt)` runs `stream_video` in a thread, `switch(prompt)` queues a prompt for
    the next chunk, `events` receives one dict per chunk (then {"done": true})."""

    def __init__(self, teacher, student, num_chunks: int, seed: int, recache: bool):
        self.teacher, self.student = teacher, student
        self.num_chunks, self.seed, self.recache = num_chunks, seed, recache
        self.lock = threading.Lock()
        self.events: queue.Queue = queue.Queue()
        self.pending: str | None = None
        self.prompt = ""
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, prompt: str) -> None:
        self.close()
        self.stop = threading.Event()
        self.events = queue.Queue()
        self.prompt, self.pending = prompt, None
        self.thread = threading.Thread(target=self._run, args=(prompt, self.stop, self.events), daemon=True)
        self.thread.start()

    def switch(self, prompt: str) -> None:
        with self.lock:
            self.pending = prompt

    def _next_prompt(self, chunk: int) -> str | None:
        with self.lock:
            new, self.pending = self.pending, None
        if new is not None:
            self.prompt = new
        return new

    def _run(self, prompt: str, stop: threading.Event, events: queue.Queue) -> None:
        t0 = time.perf_counter()
        frames = 0
        try:
            chunks = stream_video(
                self.teacher, self.student, prompt, self.num_chunks, self.seed, self._next_prompt, self.recache
            )
            for i, video in enumerate(chunks):
                if stop.is_set():
                    break
                frames += len(video)
                elapsed = time.perf_counter() - t0
                events.put(
                    {
                        "chunk": i,
                        "prompt": self.prompt,
                        "frames": [png_data_url(f) for f in video],
                        "elapsed_s": elapsed,
                        "generated_fps": frames / elapsed,
                    }
                )
        except Exception as e:  # the page shows it; the server keeps serving
            logger.exception("serve: the stream failed")
            events.put({"error": f"{type(e).__name__}: {e}"})
        events.put({"done": True})

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)


def make_handler(live: LiveStream, fps: int):
    page = PAGE.read_text().replace("__FPS__", str(int(fps)))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            logger.debug("serve: " + fmt, *args)

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path in ("/", "/index.html"):
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if self.path == "/events":
                return self._events()
            return self._send(404, b"not found", "text/plain")

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                prompt = str(json.loads(self.rfile.read(length) or b"{}").get("prompt", "")).strip()
            except (ValueError, AttributeError):
                return self._send(400, b'{"error": "expected JSON {\\"prompt\\": \\"...\\"}"}', "application/json")
            if not prompt:
                return self._send(400, b'{"error": "empty prompt"}', "application/json")
            if self.path == "/start":
                live.start(prompt)
            elif self.path == "/switch":
                live.switch(prompt)
            else:
                return self._send(404, b"not found", "text/plain")
            return self._send(200, json.dumps({"ok": True, "prompt": prompt}).encode(), "application/json")

        def _events(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            events = live.events
            try:
                while True:
                    if events is not live.events:  # a new stream started: follow it
                        events = live.events
                    try:
                        event = events.get(timeout=1.0)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        continue
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler


def serve(teacher, student, *, host: str, port: int, fps: int, num_chunks: int, seed: int, recache: bool):
    """A started server (`server.serve_forever()` runs it; `server.server_address` has the port, 0 picks one)."""
    if host not in LOOPBACK:
        raise ValueError(f"serve.host: {host!r}; the page serves loopback addresses only ({', '.join(LOOPBACK)})")
    live = LiveStream(teacher, student, num_chunks, seed, recache)
    server = ThreadingHTTPServer((host, port), make_handler(live, fps))
    server.daemon_threads = True
    server.live = live  # type: ignore[attr-defined]
    return server


def serve_stage(recipe) -> None:
    """`python -m distill serve RECIPE`: load the teacher and the causal student once, then serve until Ctrl-C."""
    from distill.stream_stage import resolve_student
    from students.streaming import load_causal_student
    from teachers.wan import WanTeacher

    folder, _ = resolve_student(recipe)
    teacher = WanTeacher.from_config(recipe.teacher)
    student = load_causal_student(teacher, folder)
    sc, cfg = recipe.stream, recipe.serve
    server = serve(
        teacher,
        student,
        host=cfg.host,
        port=cfg.port,
        fps=recipe.data.fps,
        num_chunks=sc.num_chunks,
        seed=sc.seed,
        recache=sc.recache,
    )
    host, port = server.server_address[:2]
    logger.info("serve: open http://%s:%d/ (Ctrl-C stops)", host if ":" not in host else f"[{host}]", port)
    try:
        server.serve_forever()
    finally:
        server.live.close()
        server.server_close()
