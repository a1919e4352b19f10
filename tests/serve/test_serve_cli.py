"""`edgellama serve` as a process: it serves, SIGTERM finishes the reply in flight and refuses new
connections, and bad arguments are one line and exit 2 before anything loads."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys

import pytest

from tests.serve.conftest import serve_process


def test_sigterm_finishes_the_reply_in_flight(tiny_folders):
    with serve_process(f"m={tiny_folders['tiny-dyn']}", "--provider", "cpu", "--threads", "1") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": "m", "prompt": "go", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")
        proc.send_signal(signal.SIGTERM)
        events = [line for line in resp.read().decode().split("\n\n") if line.strip()]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] == 200
        assert proc.wait(timeout=60) in (0, 143)      # 143: the CLI's status for a run ended by SIGTERM
        with pytest.raises(OSError):
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")


@pytest.mark.parametrize("args,words", [
    (["serve", "a=x", "a=y"], "given twice"),
    (["serve", "x", "--replicas", "2"], "--replicas needs --ray"),
    (["serve", "x", "--port", "70000"], "--port must be"),
    (["serve", "x", "--parallel", "0"], "--parallel must be at least 1"),
    (["serve", "/no/such/folder", "--port", "0"], "/no/such/folder"),
])
def test_bad_arguments_are_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "edgellama", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellama: error:") and words in lines[0], proc.stderr
