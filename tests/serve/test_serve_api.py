"""The OpenAI API through the official client against a live server: every reply equals the Generator's
in-process result for the same request (text, finish reason, token counts, logprobs)."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import client, get_json, live_server

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(served_models):
    with live_server(served_models, parallel=2, queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return client(server)


@pytest.mark.parametrize("model", ["tiny", "tiny-dyn"])
def test_chat_equals_the_generator(api, served_models, model):
    gen = served_models[model].generator
    want = gen.generate(MESSAGES, chat=True, max_new_tokens=12)
    got = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(gen.encode(MESSAGES, chat=True))
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.model == model and got.object == "chat.completion"


def test_chat_stream_joins_to_the_reply_and_counts_usage(api):
    full = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20)
    chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_stream_and_not(api, served_models):
    want = served_models["tiny-dyn"].generator.generate("Once upon", max_new_tokens=10)
    got = api.completions.create(model="tiny-dyn", prompt="Once upon", max_tokens=10)
    assert got.choices[0].text == want.text and got.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in api.completions.create(model="tiny-dyn", prompt="Once upon",
                                                                          max_tokens=10, stream=True))
    assert streamed == want.text


def test_completion_from_token_ids(api, served_models):
    ids = [5, 6, 7, 8]
    want = served_models["tiny"].generator.generate_ids(ids, max_new_tokens=6)[0]
    got = api.completions.create(model="tiny", prompt=ids, max_tokens=6)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)


def test_seeded_sampling_matches_in_process(api, served_models):
    gen = served_models["tiny"].generator
    want = gen.generate(MESSAGES, chat=True, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    got = [api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0.9, top_p=0.9,
                                       seed=7).choices[0].message.content for _ in range(2)]
    assert got == [want.text, want.text]
    other = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0.9, top_p=0.9,
                                        seed=8).choices[0].message.content
    assert other != want.text


def test_stop_string_cuts_the_unstopped_reply(api):
    prompt = "hello world"
    free = api.completions.create(model="tiny", prompt=prompt, max_tokens=40).choices[0].text
    # A plain character past the start (the random model also writes bytes that decode to U+FFFD).
    stop = next(c for c in free[1:] if c.isascii() and c.isalnum())
    got = api.completions.create(model="tiny", prompt=prompt, max_tokens=40, stop=[stop])
    assert got.choices[0].text == free[:free.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                                                          stop=stop, stream=True))
    assert streamed == got.choices[0].text


def test_logprobs_are_the_generators(api, served_models):
    want = served_models["tiny"].generator.generate(MESSAGES, chat=True, max_new_tokens=6, logprobs=3, eos=False)
    got = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want.logprobs][:len(content)])
    assert len(content) == len(want.token_ids) - (got.choices[0].finish_reason == "stop")
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    streamed = [e.logprob for ch in api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                                                 logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content])
    comp = api.completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=2)
    assert len(comp.choices[0].logprobs.token_logprobs) == len(comp.choices[0].logprobs.tokens) > 0


def test_json_schema_response_format_validates(api):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    got = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "digit", "schema": schema}})
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)


def test_models_and_health(server, api):
    assert sorted(m.id for m in api.models.list()) == ["tiny", "tiny-dyn"]
    assert api.models.retrieve("tiny").id == "tiny"
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["tiny", "tiny-dyn"]


@pytest.mark.parametrize("model", ["tiny", "tiny-dyn"])
def test_a_resent_conversation_reuses_its_cache(api, served_models, model):
    gen = served_models[model].generator
    convo = [{"role": "system", "content": f"Be brief ({model})."}, {"role": "user", "content": "first question"}]
    first = api.chat.completions.create(model=model, messages=convo, max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    convo += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "and a second one"}]
    second = api.chat.completions.create(model=model, messages=convo, max_tokens=8)
    fresh = gen.generate(convo, chat=True, max_new_tokens=8)      # a full prefill of the same conversation
    assert second.choices[0].message.content == fresh.text
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    # A history this server did not write (an edited reply) is answered by a full prefill, correctly.
    edited = [*convo[:2], {"role": "assistant", "content": "something else"}, convo[3]]
    got = api.chat.completions.create(model=model, messages=edited, max_tokens=8)
    assert got.choices[0].message.content == gen.generate(edited, chat=True, max_new_tokens=8).text
    assert got.usage.prompt_tokens_details.cached_tokens == 0
