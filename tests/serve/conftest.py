"""Helpers of the server tests: tiny folders with a tokenizer, a real uvicorn server on a free loopback
port (in a thread, or `edgellama serve` in a subprocess), raw HTTP for what the openai client never sends."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """The built-in tiny model (byte tokenizer, ChatML template) exported to both KV cache contracts
    (the session's shared folders: the server only reads them)."""
    pytest.importorskip("torch")
    from tests.conftest import shared_export

    return {"tiny": shared_export(tmp_path_factory, "tiny", target="ort"),
            "tiny-dyn": shared_export(tmp_path_factory, "tiny", target="ort", kv_cache="dynamic")}


@pytest.fixture(scope="session")
def served_models(tiny_folders):
    from edgellama.serve.models import load_models

    return load_models([f"{n}={p}" for n, p in tiny_folders.items()], provider="cpu", threads=1)


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port from a thread (signal handling stays the test's)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def run_in_loop(self, coro, timeout: float = 10) -> Any:
        """Run a coroutine on the server's event loop (to hold a slot the way a request does)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.server.servers[0].get_loop()).result(timeout)

    def health(self) -> dict:
        return get_json(self.url + "/health")[1]


@contextlib.contextmanager
def live_server(models, **settings) -> Iterator[LiveServer]:
    from edgellama.serve.app import create_app
    from edgellama.serve.settings import ServeSettings

    with LiveServer(create_app(models, ServeSettings(**settings))) as server:
        yield server


def client(server: LiveServer, *, key: str = "unused", timeout: float = 60):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def post_raw(url: str, body: bytes | str, *, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST bytes as they are (malformed JSON included); (status, parsed JSON body)."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", path, body=body.encode() if isinstance(body, str) else body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def get_json(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _split(url: str) -> tuple[str, int, str]:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    return m.group(1), int(m.group(2)), m.group(3)


def wait_for(predicate, *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`edgellama serve ... --port 0` in a subprocess; yields (process, base URL) once /health answers."""
    argv = [sys.executable, "-m", "edgellama", "serve", *args, "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if not m:
            proc.kill()
            raise AssertionError(f"serve did not start: {line}{proc.stderr.read()}")
        url = m.group(1)
        wait_for(lambda: _answers(url), what="the server's /health")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()


def _answers(url: str) -> bool:
    try:
        return get_json(url + "/health")[0] == 200
    except OSError:
        return False
