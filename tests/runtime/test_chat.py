"""ChatSession (runtime/chat.py): each turn prefills only what the cache lacks, and its greedy reply is
the one a fresh full prefill of the same conversation gives, on a static and a dynamic folder;
rewind, reset, a stream stopped early, and refused calls that leave the session usable."""

from __future__ import annotations

import pytest

from edgellama.errors import RuntimeInputError
from edgellama.runtime import ChatSession
from edgellama.runtime.generator import Generator

KW = dict(max_new_tokens=12)


@pytest.fixture(scope="module", params=["static", "dynamic"])
def gen(request, text_folders):
    return Generator(text_folders[request.param], provider="cpu")


def fresh(gen, messages, **kw):
    """The reference: the whole conversation prefilled from nothing."""
    return gen.generate(messages, chat=True, **{**KW, **kw})


def test_turns_reuse_the_cache_and_equal_a_fresh_prefill(gen):
    chat = ChatSession(gen, system="Answer briefly.")
    first = chat.send("The cat sat", **KW)
    assert first.reused_tokens == 0 and first.prefill_tokens == first.prompt_tokens
    assert first.token_ids == fresh(gen, [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": "The cat sat"}]).token_ids
    for message in ("on what?", "and then"):
        before = chat.cached_tokens
        convo = [*chat.messages, {"role": "user", "content": message}]
        r = chat.send(message, **KW)
        assert r.token_ids == fresh(gen, convo).token_ids and r.text == fresh(gen, convo).text
        assert r.reprefill_reason is None and r.reused_tokens == before > 0
        assert r.prefill_tokens == r.prompt_tokens - before < r.prompt_tokens
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_a_reply_rendered_differently_is_prefilled_again_and_said(gen):
    chat = ChatSession(gen)
    free = fresh(gen, [{"role": "user", "content": "The cat sat"}], eos=False)
    stop = free.text[3:5]
    r = chat.send("The cat sat", eos=False, stop=[stop], **{k: v for k, v in KW.items()})
    assert r.finish_reason == "stop" and chat.messages[-1]["content"] == r.text
    # The cache holds the stop string's tokens, the conversation does not: they part there.
    convo = [*chat.messages, {"role": "user", "content": "next"}]
    nxt = chat.send("next", **KW)
    assert "differently" in nxt.reprefill_reason and 0 < nxt.reused_tokens < nxt.prompt_tokens
    assert nxt.token_ids == fresh(gen, convo).token_ids


def test_rewind_and_reset(gen):
    chat = ChatSession(gen)
    chat.send("The cat sat", **KW)
    after_one = (chat.cached_tokens, chat.messages)
    chat.send("on what?", **KW)
    with pytest.raises(RuntimeInputError, match=f"cannot rewind {chat.cached_tokens + 1} tokens"):
        chat.rewind(chat.cached_tokens + 1)
    with pytest.raises(RuntimeInputError, match="rewind takes"):
        chat.rewind(-1)
    assert len(chat.messages) == 4                                 # a refused rewind changed nothing
    chat.rewind(chat.cached_tokens - after_one[0])                  # back to the end of the first reply
    assert chat.cached_tokens == after_one[0]
    assert chat.messages == after_one[1][:1]     # the first reply is not wholly cached (its end token is not)
    r = chat.send("other", **KW)
    assert r.token_ids == fresh(gen, [*after_one[1][:1], {"role": "user", "content": "other"}]).token_ids
    chat.reset()
    assert chat.messages == [] and chat.cached_tokens == 0
    assert chat.send("The cat sat", **KW).reused_tokens == 0


def test_a_stream_stopped_early_keeps_the_session(gen):
    chat = ChatSession(gen)
    s = chat.stream("The cat sat", max_new_tokens=20, eos=False)
    for i, _ in enumerate(s):
        if i == 2:
            break
    r = s.result
    assert r.finish_reason == "cancelled" and chat.messages[-1] == {"role": "assistant", "content": r.text}
    convo = [*chat.messages, {"role": "user", "content": "go on"}]
    assert chat.send("go on", **KW).token_ids == fresh(gen, convo).token_ids


@pytest.mark.parametrize("kwargs,words", [({"stop": [""]}, "cannot be empty"), ({"top_k": -1}, "top_k"),
                                          ({"max_new_tokens": 0}, "max_new_tokens")])
def test_refused_calls_leave_the_session_usable(gen, kwargs, words):
    chat = ChatSession(gen)
    chat.send("The cat sat", **KW)
    state = (chat.cached_tokens, chat.messages)
    with pytest.raises(RuntimeInputError, match=words):
        chat.send("next", **kwargs)
    with pytest.raises(RuntimeInputError, match="past the context|the prompt has"):
        chat.send("x" * 400, **KW)
    assert (chat.cached_tokens, chat.messages) == state
    convo = [*chat.messages, {"role": "user", "content": "next"}]
    r = chat.send("next", **KW)
    assert r.token_ids == fresh(gen, convo).token_ids and r.reused_tokens == state[0]


@pytest.mark.parametrize("mode", ["numpy", "iobinding"])
def test_other_dynamic_loops_rewind_too(text_folders, mode):
    gen = Generator(text_folders["dynamic"], provider="cpu", loop=mode)
    chat = ChatSession(gen)
    free = fresh(gen, [{"role": "user", "content": "The cat sat"}], eos=False)
    chat.send("The cat sat", eos=False, stop=[free.text[3:5]], **KW)     # its cache must be rewound next turn
    convo = [*chat.messages, {"role": "user", "content": "next"}]
    r = chat.send("next", **KW)
    assert r.reprefill_reason and r.token_ids == fresh(gen, convo).token_ids
