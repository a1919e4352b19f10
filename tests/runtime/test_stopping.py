"""Stop strings (runtime/stopping.py and the Generator's `stop=`): matched across token boundaries,
never emitted, streams hold back only what may still become one; checked against a plain search
on the unstopped output and against transformers' `generate(stop_strings=...)`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellama.errors import RuntimeInputError
from edgellama.runtime.generator import Generator
from edgellama.runtime.stopping import StopText, find_stop, held_back


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def stream_text(text: str, stops):
    s = StopText(byte_decode, stops)
    pieces = [s.push(b) for b in text.encode()]
    pieces.append(s.flush())
    return pieces, s


def test_find_and_hold_back():
    assert find_stop("abcabc", ["ca", "bc"]) == (1, "bc")
    assert find_stop("abcabc", ["abc", "ab"]) == (0, "abc")      # same start: the longer one
    assert find_stop("abc", ["x"]) is None and find_stop("abcab", ["ab"], start=1) == (3, "ab")
    assert held_back("hello wor", ["world", "xyz"]) == 3
    assert held_back("hello", ["lo!"]) == 2 and held_back("hello", ["!"]) == 0


def test_a_stop_string_spanning_tokens_is_never_emitted():
    pieces, s = stream_text("say: END of it", ["END"])
    assert "".join(pieces) == "say: " and s.match == "END" and s.cut == 5
    assert all("E" not in p for p in pieces)


def test_streaming_holds_back_only_a_possible_start():
    s = StopText(byte_decode, ["\n\nQ:"])
    out = [s.push(b) for b in b"ab\n"]
    assert out == ["a", "b", ""]                   # "\n" may begin the stop string: held
    assert s.push(ord("c")) == "\nc"               # no longer: released at once
    assert s.flush() == ""


def test_a_multibyte_character_completes_a_stop_string():
    pieces, s = stream_text("prix: 5€ net", ["5€"])
    assert "".join(pieces) == "prix: " and s.match == "5€"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\né", max_size=30), st.lists(st.text(alphabet="ab\né", min_size=1, max_size=4),
                                                       min_size=1, max_size=3))
def test_streamed_text_is_the_text_cut_before_the_first_stop(text, stops):
    # One character a token: the first stop string to complete wins (the earliest end; at one
    # end, the longest), as generation would have stopped there.
    pieces, _ = stream_text(text, stops)
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    cut = min(found)[1] if found else len(text)
    assert "".join(pieces) == text[:cut]


# -- on a model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["static", "dynamic"])
def gen(request, text_folders):
    return Generator(text_folders[request.param], provider="cpu")


PROMPT = "The cat sat"


def tokens_until(gen, ids, stop):
    """The fewest leading tokens of `ids` whose text contains `stop`."""
    return next(k for k in range(1, len(ids) + 1) if stop in gen.decode(ids[:k]))


def test_stopped_output_is_the_unstopped_one_cut(gen):
    free = gen.generate(PROMPT, chat=True, max_new_tokens=30, eos=False)
    assert len(free.text) > 8
    for stop in (free.text[2:5], free.text[-4:-1], [free.text[3:5], "never there"]):
        r = gen.generate(PROMPT, chat=True, max_new_tokens=30, eos=False, stop=stop)
        stops = [stop] if isinstance(stop, str) else stop
        found = find_stop(free.text, stops)
        assert r.text == free.text[:found[0]]
        k = tokens_until(gen, free.token_ids, found[1])
        assert r.token_ids == free.token_ids[:k]        # ends with the token that completed it
        assert (r.finish_reason, r.stop_reason) == ("stop", found[1])
        s = gen.stream(PROMPT, chat=True, max_new_tokens=30, eos=False, stop=stop)
        pieces = list(s)
        assert "".join(pieces) == r.text == s.result.text and s.result.token_ids == r.token_ids


def test_a_newline_stop_string_stops_sampled_text(gen):
    # Sampled runs draw the same tokens with or without stop strings (one draw a step), so the
    # stopped run is the unstopped one cut at its first newline.
    kw = dict(chat=True, max_new_tokens=40, eos=False, temperature=1.0)
    seeds = [s for s in range(60) if "\n" in gen.generate(PROMPT, seed=s, **kw).text[1:]]
    assert seeds, "no sampled run wrote a newline"
    free = gen.generate(PROMPT, seed=seeds[0], **kw)
    r = gen.generate(PROMPT, seed=seeds[0], stop=["\n"], **kw)
    assert r.text == free.text[:free.text.index("\n")] and r.stop_reason == "\n" and "\n" not in r.text


def test_stop_strings_equal_transformers(text_folders):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    gen = Generator(text_folders["dynamic"], provider="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(text_folders["hf"])
    tok = transformers.AutoTokenizer.from_pretrained(text_folders["hf"])
    ids = gen.encode(PROMPT, chat=True)
    free = gen.generate_ids(ids, max_new_tokens=30, eos=False)[0].text
    for stop in (free[1:4], free[4:6]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, stop_strings=[stop],
                              tokenizer=tok, eos_token_id=None, pad_token_id=0)
        assert gen.generate_ids(ids, max_new_tokens=30, eos=False, stop=[stop])[0].token_ids == \
            out[0, len(ids):].tolist()


@pytest.mark.parametrize("stop,words", [("", "cannot be empty"), (["a", ""], "cannot be empty"),
                                        ([3], "must be text"), ({"a"}, "string or a list")])
def test_bad_stop_strings_are_refused_and_the_generator_still_works(gen, stop, words):
    with pytest.raises(RuntimeInputError, match=words):
        gen.generate(PROMPT, stop=stop, max_new_tokens=2)
    assert len(gen.generate(PROMPT, max_new_tokens=2, eos=False).token_ids) == 2
