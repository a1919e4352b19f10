"""runtime/constraints.py: llguidance's token mask checked against Python's `re` on a small BPE
vocabulary (every state of every path), refusals that leave the constraint usable, rollback, bad
grammars in one line, and JSON schemas that a greedy or sampled random-weight tiny model follows
through Generator.generate(json_schema=) (output parsed and validated with `jsonschema`); slow:
sampled smollm2 generations."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from edgellama.errors import RuntimeInputError
from edgellama.runtime.constraints import build_constraint

# A byte-level BPE whose tokens span several characters, so a token can be allowed for a prefix
# that a single-character check would refuse (and the other way round).
TOKENS = ["<eos>", "a", "b", "c", "1", "2", "-", "ab", "ba", "bc", "abc", "12", "21", "-1", "c-"]
MERGES = [("a", "b"), ("b", "a"), ("b", "c"), ("ab", "c"), ("1", "2"), ("2", "1"), ("-", "1"), ("c", "-")]
ALPHABET = "abc12-"
EOS = 0

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def small_tokenizer(*, decoder: bool = True):
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from edgellama.tokenizer import Tokenizer

    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if decoder:
        backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    return Tokenizer(backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def language(pattern: str, longest: int = 6) -> set[str]:
    """Every string over ALPHABET of at most `longest` characters that `re` fullmatches."""
    rx = re.compile(pattern)
    return {"".join(s) for n in range(longest + 1) for s in itertools.product(ALPHABET, repeat=n)
            if rx.fullmatch("".join(s))}


def expected_mask(text: str, matches: set[str], prefixes: set[str]) -> np.ndarray:
    """The tokens after `text` that keep it a prefix of a match; EOS when `text` is a match."""
    return np.array([text in matches if i == EOS else text + t in prefixes for i, t in enumerate(TOKENS)])


# Finite languages (all shorter than `language`'s bound), so the enumeration is complete.
@pytest.mark.parametrize("pattern", [r"(ab|ba)c?", r"-?[12]{1,3}", r"a(bc){0,2}-?", r"c-[12]|b{1,4}"])
def test_every_state_allows_exactly_the_prefix_matchable_tokens(tok, pattern):
    matches = language(pattern)
    prefixes = {m[:k] for m in matches for k in range(len(m) + 1)}
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], regex=pattern)
    seen = 0

    def walk(text: str) -> None:
        nonlocal seen
        allowed = c.allowed()
        np.testing.assert_array_equal(allowed, expected_mask(text, matches, prefixes), err_msg=repr(text))
        seen += 1
        for t in np.flatnonzero(allowed):
            if t == EOS:
                continue
            c.accept(int(t))
            walk(text + TOKENS[t])
            c.rollback(1)

    walk("")
    assert seen > len(matches)    # several tokenizations of one match were walked
    assert c.accepted == 0


def test_end_of_a_match_allows_only_eos_and_finishes(tok):
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], regex=r"ab")
    assert not c.is_finished()
    c.accept(TOKENS.index("ab"))
    assert c.is_finished() and c.is_accepting()
    assert np.flatnonzero(c.allowed()).tolist() == [EOS]


def test_a_disallowed_token_is_refused_and_changes_nothing(tok):
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], regex=r"a(bc)+")
    c.accept(TOKENS.index("a"))
    before = c.allowed()
    for bad in (TOKENS.index("c"), EOS, TOKENS.index("ab"), len(TOKENS) + 3, -1):
        with pytest.raises(RuntimeInputError, match="not allowed by the regex constraint"):
            c.accept(bad)
    np.testing.assert_array_equal(c.allowed(), before)
    c.accept(TOKENS.index("bc"))                 # still usable after the refusals
    assert c.accepted == 2 and c.allowed()[EOS]


def test_rollback_restores_the_mask(tok):
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], regex=r"-?[12]{1,3}")
    masks = [c.allowed()]
    for t in ("-1", "2", "1"):
        c.accept(TOKENS.index(t))
        masks.append(c.allowed())
    assert c.is_finished()
    for n, back in ((1, 2), (2, 0)):
        c.rollback(n)
        np.testing.assert_array_equal(c.allowed(), masks[back])
    assert c.accepted == 0
    with pytest.raises(RuntimeInputError, match="cannot roll back 1 tokens"):
        c.rollback(1)
    with pytest.raises(RuntimeInputError, match=">= 0"):
        c.rollback(-1)
    np.testing.assert_array_equal(c.allowed(), masks[0])


def test_model_width_past_the_tokenizer_is_never_allowed(tok):
    width = len(TOKENS) + 50
    c = build_constraint(tokenizer=tok, vocab_size=width, eos_ids=[EOS], regex=r"[abc12-]*")
    allowed = c.allowed()
    assert allowed.shape == (width,) and allowed[:len(TOKENS)].all() and not allowed[len(TOKENS):].any()
    with pytest.raises(RuntimeInputError, match="not allowed"):
        c.accept(len(TOKENS) + 1)


def test_a_lark_grammar(tok):
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS],
                         grammar='start: pair ("-" pair)*\npair: "ab" | "ba"')
    for t in ("ab", "-", "ba"):
        c.accept(TOKENS.index(t))
    allowed = {TOKENS[i] for i in np.flatnonzero(c.allowed())}
    assert allowed == {"<eos>", "-"}        # "-1", "c-", "a" would leave the grammar


def test_a_mask_that_allows_nothing_is_refused(tok):
    c = build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], regex=r"a?z")   # no "z" token
    assert np.flatnonzero(c.allowed()).tolist() == [TOKENS.index("a")]
    c.accept(TOKENS.index("a"))
    for _ in range(2):
        with pytest.raises(RuntimeInputError, match="allows no token .* after 1 tokens") as err:
            c.allowed()
        assert "\n" not in str(err.value)
    c.rollback(1)                                 # the constraint is still usable
    assert np.flatnonzero(c.allowed()).tolist() == [TOKENS.index("a")]


@pytest.mark.parametrize("kwargs, words", [
    (dict(regex="[a-"), "invalid regex: .*unclosed character class"),
    (dict(regex=""), "non-empty"),
    (dict(grammar="start: missing_rule"), "invalid grammar: .*unknown name"),
    (dict(json_schema={"type": "strange"}), "invalid JSON schema: .*strange"),
    (dict(json_schema='{"type": '), "invalid JSON schema: not JSON"),
    (dict(json_schema=["a"]), "invalid JSON schema: a schema is a JSON object"),
    (dict(json_schema={"type": "integer", "minimum": "zero"}), "invalid JSON schema"),
    (dict(), "exactly one of json_schema, regex or grammar"),
    (dict(regex="a", grammar='start: "a"'), r"exactly one .* \(got regex, grammar\)"),
])
def test_bad_constraints_are_one_line(tok, kwargs, words):
    with pytest.raises(RuntimeInputError, match=words) as err:
        build_constraint(tokenizer=tok, vocab_size=len(TOKENS), eos_ids=[EOS], **kwargs)
    assert "\n" not in str(err.value)


def test_bad_tokenizer_and_ids_are_one_line(tok):
    for kwargs, words in ((dict(tokenizer=small_tokenizer(decoder=False), eos_ids=[EOS]), "cannot read this tokenizer"),
                          (dict(tokenizer=tok, eos_ids=[999]), "eos id 999 is outside"),
                          (dict(tokenizer=tok, eos_ids=[], vocab_size=0), "vocab_size must be a positive int")):
        kwargs = {"vocab_size": len(TOKENS), **kwargs}
        with pytest.raises(RuntimeInputError, match=words) as err:
            build_constraint(regex="a", **kwargs)
        assert "\n" not in str(err.value)


# -- a model following a schema, through Generator.generate(json_schema=) ----------------------------
@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory):
    pytest.importorskip("torch")
    from edgellama.runtime.generator import Generator
    from tests.conftest import shared_export

    return Generator(shared_export(tmp_path_factory, "tiny", target="ort"), provider="cpu")


def person(gen, prompt: str, *, temperature: float, seed: int, max_new_tokens: int = 120) -> str:
    res = gen.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, json_schema=PERSON)
    assert res.finish_reason == "stop", res.text      # the schema closed before the length cap
    return res.text


def test_greedy_random_model_follows_a_json_schema(tiny_gen):
    import jsonschema

    free = tiny_gen.generate("A person as JSON:", max_new_tokens=40).text
    with pytest.raises(json.JSONDecodeError):   # unconstrained, the random model writes no JSON
        json.loads(free)
    jsonschema.validate(json.loads(person(tiny_gen, "A person as JSON:", temperature=0.0, seed=0)), PERSON)


def test_sampled_random_model_follows_a_json_schema(tiny_gen):
    import jsonschema

    texts = [person(tiny_gen, "A person as JSON:", temperature=1.0, seed=s) for s in range(5)]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1      # sampling did sample


def test_a_regex_and_a_bad_schema_through_the_generator(tiny_gen):
    text = tiny_gen.generate("Digits:", max_new_tokens=20, temperature=1.0, seed=3, regex=r"[0-9]{3}-[0-9]{2}").text
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}", text)
    with pytest.raises(RuntimeInputError, match="invalid JSON schema"):
        tiny_gen.generate("x", max_new_tokens=4, json_schema={"type": "strange"})
    assert tiny_gen.generate("x", max_new_tokens=4, regex="ab").text == "ab"   # the generator is still usable


@pytest.mark.slow
def test_smollm2_sampled_json_all_validate(tmp_path_factory):
    import jsonschema

    from edgellama.runtime.generator import Generator
    from tests.conftest import shared_export

    gen = Generator(shared_export(tmp_path_factory, "smollm2", target="ort"), provider="cpu")
    for seed in range(12):     # bench/constraints.py runs 50
        text = gen.generate("Describe a person as JSON with a name and an age.", chat=True, max_new_tokens=96,
                            temperature=1.0, seed=seed, json_schema=PERSON).text
        jsonschema.validate(json.loads(text), PERSON)
