"""The micro-batcher: concurrent requests that can share one call run as one batch (counted in /health's
`batch_sizes`), each reply equal to its serial run, on both KV cache contracts; per-row max_tokens, stop
strings and seeds; a row whose client leaves is dropped while the batch goes on; what cannot batch runs
alone. Underneath: a Call with one GenerationOptions per row gives each row what it gives alone."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.conftest import client, live_server, wait_for

FOLDERS = ["tiny", "tiny-dyn"]      # static and dynamic KV cache


# -- the runtime underneath: one call, options per row ----------------------------------------------------
def _alone(gen, ids, opts):
    return gen.generate_ids(ids, options=opts)[0]


def _batch(gen, rows, opts):
    from edgellama.runtime.call import Call

    run = Call(gen, rows, options=opts)
    for _ in run.steps():
        pass
    return run.results()


@pytest.mark.parametrize("name", FOLDERS)
def test_rows_with_their_own_length_stop_and_seed_equal_their_runs_alone(served_models, name):
    gen = served_models[name].generator
    rows = [gen.encode(t) for t in ("a", "the longest prompt of them all", "mid length", "b c", "seeded one")]
    # A stop string each row's own text reaches: found from its unstopped run.
    free = [_alone(gen, r, gen.options(max_new_tokens=40, eos=False)).text for r in rows]
    stops = [t[6:8] if len(t) >= 8 else None for t in free]
    assert any(stops)
    greedy = [gen.options(max_new_tokens=12 + 7 * i, stop=stops[i]) for i in range(len(rows))]
    sampled = [gen.options(max_new_tokens=10 + 5 * i, temperature=0.9, top_k=40, seed=7 + i, stop=stops[i])
               for i in range(len(rows))]
    for opts in (greedy, sampled):
        alone = [_alone(gen, r, o) for r, o in zip(rows, opts)]
        batch = _batch(gen, rows, opts)
        for a, b in zip(alone, batch):
            assert (b.token_ids, b.text, b.finish_reason, b.stop_reason, b.seed) == \
                   (a.token_ids, a.text, a.finish_reason, a.stop_reason, a.seed)
        assert len({len(b.token_ids) for b in batch}) > 1      # rows really ended at different steps
    assert any(b.finish_reason == "stop" and isinstance(b.stop_reason, str) for b in _batch(gen, rows, greedy))


def test_one_options_for_a_batch_keeps_one_random_generator(served_models):
    """Without per-row options a seeded batch draws from one generator, as before (rows differ from alone)."""
    gen = served_models["tiny-dyn"].generator
    rows = [gen.encode("same"), gen.encode("same")]
    opts = gen.options(max_new_tokens=30, temperature=1.0, seed=3, eos=False)
    shared = _batch(gen, rows, opts)
    per_row = _batch(gen, rows, [opts, opts])
    assert per_row[0].token_ids == per_row[1].token_ids == _alone(gen, rows[0], opts).token_ids
    assert shared[0].token_ids != shared[1].token_ids


def test_rows_must_share_the_pipeline(served_models):
    from edgellama.errors import RuntimeInputError

    gen = served_models["tiny"].generator
    rows = [gen.encode("x"), gen.encode("y")]
    with pytest.raises(RuntimeInputError, match="may differ only in max_new_tokens, stop, seed"):
        _batch(gen, rows, [gen.options(temperature=0.5), gen.options(temperature=0.7)])
    with pytest.raises(RuntimeInputError, match="one per row"):
        _batch(gen, rows, [gen.options()])


def test_a_dropped_row_ends_cancelled_and_the_others_go_on(served_models):
    from edgellama.runtime.call import Call

    gen = served_models["tiny"].generator
    rows = [gen.encode("first"), gen.encode("second one"), gen.encode("3")]
    opts = gen.options(max_new_tokens=20, eos=False)
    run = Call(gen, rows, options=opts)
    for step, _ in enumerate(run.steps()):
        if step == 2:
            run.drop(1)
    got = run.results()
    assert got[1].finish_reason == "cancelled" and len(got[1].token_ids) == 3
    for i in (0, 2):
        assert got[i].token_ids == _alone(gen, rows[i], opts).token_ids and got[i].finish_reason == "length"


# -- through the server ---------------------------------------------------------------------------------
def _ask(api, req: dict, *, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one request, streamed or not."""
    body = {k: v for k, v in req.items() if k != "kind"}
    if req["kind"] == "chat":
        if stream:
            chunks = list(api.chat.completions.create(**body, stream=True))
            return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                    chunks[-1].choices[0].finish_reason)
        choice = api.chat.completions.create(**body).choices[0]
        return choice.message.content, choice.finish_reason
    if stream:
        chunks = list(api.completions.create(**body, stream=True))
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason
    choice = api.completions.create(**body).choices[0]
    return choice.text, choice.finish_reason


def _serial(served_models, reqs: list[dict]) -> list[tuple[str, str]]:
    """Each request alone, one after another, on a server that never batches."""
    with live_server(served_models, max_batch=1) as server:
        api = client(server)
        out = [_ask(api, r, stream=False) for r in reqs]
        assert server.health()["batch_sizes"] == {}
        return out


class _Held:
    """Hold a server's only slot (as a running request does) so that requests queue up behind it."""

    def __init__(self, server):
        self.server, self.admission = server, server.app.state.admission

    def __enter__(self) -> "_Held":
        self.server.run_in_loop(self.admission.acquire(time.monotonic() + 120))
        return self

    def wait_queued(self, n: int) -> None:
        wait_for(lambda: self.server.health()["waiting"] == n, what=f"{n} requests waiting")

    def __exit__(self, *exc) -> None:
        async def release():
            self.admission.release()

        self.server.run_in_loop(release())


@pytest.mark.parametrize("name", FOLDERS)
def test_eight_concurrent_greedy_clients_form_one_batch_equal_to_serial(served_models, name):
    reqs = [{"kind": "chat" if i % 2 else "completion", "model": name, "max_tokens": 10 + 3 * i,
             **({"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 3)}]} if i % 2
                else {"prompt": f"text {i} " * (1 + i % 4)})} for i in range(8)]
    serial = _serial(served_models, reqs)
    assert len({t for t, _ in serial}) > 1
    with live_server(served_models, parallel=1, queue=8, batch_window_ms=5, max_batch=8) as server:
        with ThreadPoolExecutor(8) as pool, _Held(server) as held:
            futures = [pool.submit(_ask, client(server), r, stream=i % 3 != 0) for i, r in enumerate(reqs)]
            held.wait_queued(8)
        got = [f.result(timeout=120) for f in futures]
        health = server.health()
    assert got == serial
    assert health["batch_sizes"] == {"8": 1}
    assert (health["served"], health["running"], health["waiting"]) == (8, 0, 0)


def test_mixed_requests_batch_by_key_and_the_rest_run_alone(served_models):
    """Seeded sampling rows with their own seeds, stops and lengths batch together; greedy ones apart;
    a constrained request and a logprobs request (a key of its own) run alone."""
    sampled = [{"kind": "completion", "model": "tiny-dyn", "prompt": f"sample {i}", "max_tokens": 12 + 4 * i,
                "temperature": 0.8, "seed": 40 + i, **({"stop": ["e"]} if i % 2 else {})} for i in range(3)]
    greedy = [{"kind": "chat", "model": "tiny-dyn", "messages": [{"role": "user", "content": f"hi {i}"}],
               "max_tokens": 16} for i in range(2)]
    alone = [{"kind": "chat", "model": "tiny-dyn", "messages": [{"role": "user", "content": "json"}],
              "max_tokens": 16, "response_format": {"type": "json_object"}},
             {"kind": "completion", "model": "tiny-dyn", "prompt": "lp", "max_tokens": 6, "logprobs": 2}]
    reqs = sampled + greedy + alone
    serial = _serial(served_models, reqs)
    with live_server(served_models, parallel=1, queue=8, max_batch=8) as server:
        with ThreadPoolExecutor(len(reqs)) as pool, _Held(server) as held:
            futures = [pool.submit(_ask, client(server), r, stream=True) for r in reqs]
            held.wait_queued(len(reqs))
        got = [f.result(timeout=120) for f in futures]
        health = server.health()
    assert got == serial
    # The constrained request never reaches the batcher; the logprobs one is a group of one.
    assert health["batch_sizes"] == {"3": 1, "2": 1, "1": 1}
    assert health["served"] == len(reqs)


def test_a_client_leaving_mid_stream_is_dropped_and_the_batch_goes_on(served_models):
    reqs = [{"kind": "completion", "model": "tiny", "prompt": f"stay {i}", "max_tokens": 120,
             "extra_body": {"ignore_eos": True}} for i in range(3)]
    serial = _serial(served_models, reqs)
    with live_server(served_models, parallel=1, queue=8) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        with ThreadPoolExecutor(3) as pool, _Held(server) as held:
            futures = [pool.submit(_ask, client(server), r, stream=True) for r in reqs]
            body = {"model": "tiny", "prompt": "leaves", "max_tokens": 200, "stream": True, "ignore_eos": True}
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            held.wait_queued(4)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")
        conn.sock.close()
        conn.close()
        got = [f.result(timeout=120) for f in futures]
        wait_for(lambda: server.health()["cancelled"] == 1 and server.health()["running"] == 0,
                 what="the dropped row to be counted")
        health = server.health()
    assert got == serial and all(finish == "length" for _, finish in got)
    assert health["batch_sizes"] == {"4": 1} and health["served"] == 3


def test_rows_that_would_not_fit_the_context_together_go_to_separate_batches(served_models):
    context = served_models["tiny-dyn"].context
    long_prompt = "y" * (context // 2)
    reqs = [{"kind": "completion", "model": "tiny-dyn", "prompt": long_prompt, "max_tokens": 8},
            {"kind": "completion", "model": "tiny-dyn", "prompt": "z", "max_tokens": context - 20}]
    serial = _serial(served_models, reqs)
    with live_server(served_models, parallel=1, queue=8) as server:
        with ThreadPoolExecutor(2) as pool, _Held(server) as held:
            futures = [pool.submit(_ask, client(server), r, stream=False) for r in reqs]
            held.wait_queued(2)
        got = [f.result(timeout=120) for f in futures]
        assert server.health()["batch_sizes"] == {"1": 2}
    assert got == serial


def test_batch_keys(served_models):
    from edgellama.serve import generation
    from edgellama.serve.schemas import ChatRequest, CompletionRequest

    model = served_models["tiny"]

    def key(req):
        return generation.plan(model, req).batch_key()

    base = key(CompletionRequest(model="tiny", prompt="a", max_tokens=4))
    assert base is not None
    assert key(CompletionRequest(model="tiny", prompt="other", max_tokens=9, stop=["x"], seed=5)) == base
    assert key(CompletionRequest(model="tiny", prompt="a", max_tokens=4, temperature=0.5)) != base
    assert key(CompletionRequest(model="tiny", prompt="a", max_tokens=4, logprobs=1)) != base
    first_turn = [{"role": "user", "content": "hi"}]
    assert key(ChatRequest(model="tiny", messages=first_turn, max_tokens=4)) == base
    follow_up = [*first_turn, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}]
    assert key(ChatRequest(model="tiny", messages=follow_up, max_tokens=4)) is None
    assert key(ChatRequest(model="tiny", messages=first_turn, max_tokens=4,
                           response_format={"type": "json_object"})) is None


@pytest.mark.parametrize("args,words", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--batch-window-ms", "-1"], "--batch-window-ms must be in 0..1000"),
])
def test_bad_batch_arguments_are_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "edgellama", "serve", "x", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellama: error:") and words in lines[0], proc.stderr
