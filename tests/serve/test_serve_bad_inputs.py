"""Every client mistake is a 4xx with an OpenAI-style error body, never a 500, and the server keeps
serving; the API key guards /v1 when set."""

from __future__ import annotations

import json

import openai
import pytest

from tests.serve.conftest import client, get_json, live_server, post_raw

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(served_models):
    with live_server(served_models, parallel=2, queue=4) as s:
        yield s


def _chat(**fields) -> str:
    return json.dumps({"model": "tiny", "messages": OK_MESSAGES, "max_tokens": 4, **fields})


BAD = [
    # (route, body, status, param or None, words in the message)
    (CHAT, "{not json", 400, None, "not valid JSON"),
    (CHAT, "[1, 2]", 400, None, "JSON object"),
    (CHAT, json.dumps({"messages": OK_MESSAGES}), 400, "model", "missing"),
    (CHAT, _chat(model="no-such-model"), 404, "model", "does not exist"),
    (COMP, json.dumps({"model": "nope", "prompt": "x"}), 404, "model", "does not exist"),
    (CHAT, _chat(messages=[]), 400, "messages", "at least 1"),
    (CHAT, _chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", "Input should be"),
    (CHAT, _chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, _chat(max_tokens=10_000), 400, "messages", "maximum context length is 256"),
    (CHAT, _chat(messages=[{"role": "user", "content": "x" * 400}]), 400, "messages", "maximum context length"),
    (COMP, json.dumps({"model": "tiny", "prompt": "y" * 300}), 400, "prompt", "maximum context length"),
    (COMP, json.dumps({"model": "tiny", "prompt": [1, 2, 99999]}), 400, "prompt", "vocab"),
    (COMP, json.dumps({"model": "tiny", "prompt": ""}), 400, "prompt", "empty"),
    (COMP, json.dumps({"model": "tiny", "prompt": ["a", "b"]}), 400, "prompt", "one prompt"),
    (CHAT, _chat(temperature=-0.5), 400, "temperature", "greater than or equal to 0"),
    (CHAT, _chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    (CHAT, _chat(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, _chat(top_k=-1), 400, "top_k", "greater than or equal to 0"),
    (CHAT, _chat(seed=-3), 400, "seed", "greater than or equal to 0"),
    (CHAT, _chat(n=2), 400, "n", "less than or equal to 1"),
    (CHAT, _chat(stop=[""]), 400, "stop", "cannot be empty"),
    (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty", "greater than 0"),
    (CHAT, _chat(presence_penalty=0.5), 400, None, "not supported"),
    (CHAT, _chat(top_logprobs=50, logprobs=True), 400, "top_logprobs", "less than or equal to 20"),
    (CHAT, _chat(max_token=5), 400, "max_token", "unrecognized request argument"),
    (CHAT, _chat(response_format={"type": "json_schema"}), 400, "response_format", "needs a json_schema"),
    (CHAT, _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
     400, None, "schema"),
    (CHAT, _chat(response_format={"type": "yaml"}), 400, "response_format.type", "Input should be"),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD, ids=[f"{i}-{b[3] or b[4]}" for i, b in enumerate(BAD)])
def test_client_mistakes_are_4xx_with_an_openai_error(server, route, body, status, param, words):
    got_status, got = post_raw(server.url + route, body)
    assert got_status == status, got
    err = got["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] in ("invalid_request_error", "not_found_error")
    assert words.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param
    # Still serving after every refusal.
    assert post_raw(server.url + CHAT, _chat())[0] == 200


def test_unknown_route_and_method_are_openai_errors(server):
    status, body = get_json(server.url + "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = get_json(server.url + CHAT)
    assert status == 405 and "error" in body


def test_the_client_sees_typed_errors(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="ghost", messages=OK_MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=OK_MESSAGES, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):   # refused before the stream starts: a 400, not a broken stream
        list(api.chat.completions.create(model="tiny", messages=OK_MESSAGES, temperature=5, stream=True))


def test_api_key(served_models, monkeypatch):
    from edgellama.serve.settings import API_KEY_ENV, ServeSettings

    with live_server(served_models, api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert post_raw(server.url + CHAT, _chat())[0] == 401
        assert [m.id for m in client(server, key="s3cret").models.list()] == ["tiny", "tiny-dyn"]
        assert get_json(server.url + "/health")[0] == 200      # liveness probes need no key
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeSettings.with_env_key().api_key == "from-env"
    assert ServeSettings.with_env_key(api_key="flag").api_key == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert ServeSettings.with_env_key().api_key is None
