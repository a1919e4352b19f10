"""Concurrency through the live server: 8 clients at once get their serial replies, a full queue answers
429, a client that leaves mid-stream stops its generation and frees its slot, a timeout is a 504."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve.conftest import client, live_server, post_raw, wait_for


def _request(i: int) -> dict:
    """Eight different requests: greedy and seeded sampling, chat and completions, both folders."""
    model = "tiny" if i % 2 else "tiny-dyn"
    sampling = {"temperature": 0.8, "seed": 100 + i} if i % 3 == 0 else {}
    if i % 4 < 2:
        return {"kind": "chat", "model": model, "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 24, **sampling}
    return {"kind": "completion", "model": model, "prompt": f"text number {i}", "max_tokens": 24, **sampling}


def _run(api, req: dict, *, stream: bool) -> str:
    body = {k: v for k, v in req.items() if k != "kind"}
    if req["kind"] == "chat":
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(**body, stream=True))
        return api.chat.completions.create(**body).choices[0].message.content
    if stream:
        return "".join(c.choices[0].text for c in api.completions.create(**body, stream=True))
    return api.completions.create(**body).choices[0].text


def test_eight_concurrent_clients_equal_serial(served_models):
    with live_server(served_models, parallel=4, queue=8) as server:
        api = client(server)
        reqs = [_request(i) for i in range(8)]
        serial = [_run(api, r, stream=False) for r in reqs]
        with ThreadPoolExecutor(8) as pool:
            streamed = list(pool.map(lambda r: _run(client(server), r, stream=True), reqs))
            plain = list(pool.map(lambda r: _run(client(server), r, stream=False), reqs))
        assert streamed == serial
        assert plain == serial
        health = server.health()
        assert health["served"] == 24 and health["running"] == 0 and health["waiting"] == 0


def test_full_queue_is_429_and_frees_up(served_models):
    with live_server(served_models, parallel=1, queue=0) as server:
        admission = server.app.state.admission
        # Hold the only slot the way a running request does, so the next one finds no room.
        server.run_in_loop(admission.acquire(time.monotonic() + 60))
        with pytest.raises(openai.RateLimitError) as e:
            client(server).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        server.run_in_loop(_release(admission))
        assert client(server).completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


async def _release(admission) -> None:
    admission.release()


def test_disconnect_mid_stream_stops_the_generation(served_models):
    with live_server(served_models, parallel=1, queue=0) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"model": "tiny-dyn", "prompt": "a long one", "max_tokens": 240, "stream": True,
                "ignore_eos": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: {")     # the first chunk arrived: it is generating
        conn.sock.close()
        conn.close()
        wait_for(lambda: server.health()["cancelled"] == 1 and server.health()["running"] == 0,
                 what="the cancelled generation to free its slot")
        assert server.health()["served"] == 0
        # The one slot is free again: a new request is served, not refused with 429.
        assert client(server).completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1


def test_waiting_past_the_timeout_is_504_and_the_server_carries_on(served_models):
    with live_server(served_models, parallel=1, queue=2, timeout=0.3) as server:
        admission = server.app.state.admission
        server.run_in_loop(admission.acquire(time.monotonic() + 60))     # the only slot, held
        status, body = post_raw(server.url + "/v1/completions",
                                json.dumps({"model": "tiny-dyn", "prompt": "x", "max_tokens": 8}))
        assert status == 504 and body["error"]["type"] == "timeout_error"
        assert server.health()["timed_out"] == 1
        server.run_in_loop(_release(admission))
        assert post_raw(server.url + "/v1/completions",
                        json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1}))[0] == 200


def test_a_generation_past_its_deadline_stops_with_a_timeout(served_models):
    from edgellama.serve import generation
    from edgellama.serve.engine import DONE, ERROR, Admission, Job
    from edgellama.serve.schemas import CompletionRequest

    call = generation.plan(served_models["tiny-dyn"], CompletionRequest(model="tiny-dyn", prompt="x", max_tokens=200,
                                                                        ignore_eos=True))

    async def run(deadline: float):
        adm = Admission(parallel=1, queue=0)
        await adm.acquire(time.monotonic() + 5)
        job = Job(call.start, admission=adm, deadline=deadline)
        job.submit()
        while True:
            kind, value = await job.events.get()
            if kind in (DONE, ERROR):
                adm.pool.shutdown(wait=True)
                return kind, value, adm.stats

    # Past its deadline at the first token: the worker stops there instead of generating 200 tokens.
    kind, err, stats = asyncio.run(run(time.monotonic() - 1))
    assert kind == ERROR and err.status == 504 and stats.timed_out == 1 and stats.tokens == 0
    kind, result, stats = asyncio.run(run(time.monotonic() + 600))
    assert kind == DONE and len(result.token_ids) == 200 and stats.timed_out == 0


def test_admission_counts():
    from edgellama.serve.engine import Admission
    from edgellama.serve.errors import APIError

    async def scenario():
        adm = Admission(parallel=1, queue=1)
        await adm.acquire(time.monotonic() + 5)
        waiter = asyncio.ensure_future(adm.acquire(time.monotonic() + 5))
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        with pytest.raises(APIError) as e:
            await adm.acquire(time.monotonic() + 5)
        assert e.value.status == 429
        adm.release()
        await waiter
        assert (adm.active, adm.waiting) == (1, 0)
        with pytest.raises(APIError) as e:   # waiting past the deadline
            await adm.acquire(time.monotonic() + 0.05)
        assert e.value.status == 504
        adm.pool.shutdown()

    asyncio.run(scenario())
