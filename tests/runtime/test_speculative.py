"""Speculative decoding (runtime/speculative.py): prompt lookup's proposals, greedy tokens identical
to plain greedy with fewer forward passes when the text repeats, seeded sampling identical and the
sampled distribution unchanged, a draft model kept in step, the switch that turns drafting off,
and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgellama.errors import ModelFolderError, RuntimeInputError
from edgellama.runtime.call import Call
from edgellama.runtime.generator import Generator
from edgellama.runtime.speculative import PROBE, PromptLookup, SpeculativeLoop, Switch

REPEATS = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"


@pytest.fixture(scope="module")
def text_gen(text_folders):
    return Generator(text_folders["static"], provider="cpu")


@pytest.fixture(scope="module")
def tiny_static(tmp_path_factory):
    """tiny's own random weights, static ort folder."""
    pytest.importorskip("torch")
    from tests.conftest import shared_export

    return shared_export(tmp_path_factory, "tiny", target="ort")


def always_drafting(num_draft: int = 8) -> Switch:
    """A switch whose costs are fixed (beta 0: a verify costs one step) and never measured, so the
    forward passes counted do not depend on the machine's timings."""
    class Fixed(Switch):
        def round(self, *, drafted, accepted, seconds):
            self.accepted = accepted if self.accepted is None else 0.7 * self.accepted + 0.3 * accepted

    switch = Fixed(num_draft=num_draft, beta=0.0)
    switch.plain_step(1.0)
    return switch


def run(gen, prompt, *, loop=None, **options):
    """(new token ids, the loop) of one call on `loop` (a SpeculativeLoop) or a fresh plain one."""
    call = Call(gen, [list(prompt)], options=gen.options(**options), loop=loop)
    for _ in call.steps():
        pass
    return call.results()[0], call.loop


def lookup_loop(gen, prompt, max_new, **kw):
    return SpeculativeLoop(gen.model, drafter=PromptLookup(), capacity=len(prompt) + max_new,
                           switch=kw.pop("switch", None) or always_drafting(), **kw)


def test_prompt_lookup_proposes_what_followed_the_longest_recent_ngram():
    p = PromptLookup(max_ngram=3)
    # "3 4" (2-gram; "9 3 4" never occurred) last seen at 2: what followed it
    assert p.propose([1, 2, 3, 4, 5, 9, 9, 3, 4], 4) == [5, 9, 9, 3]
    # the most recent occurrence wins: "7" followed by 8 at 0, by 6 at 2
    assert p.propose([7, 8, 7, 6, 7], 1) == [6]
    # a run copies on into its own output
    assert p.propose([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert p.propose([7, 7, 7, 7], 3) == [7, 7, 7]
    assert p.propose([1, 2, 3], 3) == [] and p.propose([5], 3) == []
    assert PromptLookup(min_ngram=2).propose([7, 8, 7, 6, 7], 1) == []
    with pytest.raises(RuntimeInputError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)


@pytest.mark.parametrize("which", ["text", "tiny"])
def test_greedy_identical_with_fewer_forward_passes_on_repeating_text(which, text_gen, tiny_static):
    gen = text_gen if which == "text" else Generator(tiny_static, provider="cpu")
    prompts = [gen.encode(REPEATS) if which == "text" else [40, 41, 42, 43, 44, 45] * 4, [5, 6, 7, 8, 9, 10, 11]]
    saved = []
    for prompt in prompts:
        plain, plain_loop = run(gen, prompt, max_new_tokens=80, eos=False)
        spec, loop = run(gen, prompt, loop=lookup_loop(gen, prompt, 80), max_new_tokens=80, eos=False)
        assert spec.token_ids == plain.token_ids
        saved.append(len(plain.token_ids) - loop.forwards)   # plain: a prefill and one pass per token after
        # rewind(0) drops what was drafted past the call: the cache then holds what the call fed
        loop.rewind(0)
        assert loop.cache.lengths.tolist() == [loop.past_len] == [len(prompt) + len(plain.token_ids) - 1]
    # random weights repeat themselves under greedy; the text model copies a repeating prompt
    assert all(s > 0 for s in saved) and (which == "tiny" or saved[0] >= 20), saved


def test_default_switch_and_generator_api_give_the_same_tokens(text_gen):
    """Through Generator.generate/stream with the measured switch: the same text and tokens as without."""
    kw = dict(max_new_tokens=48, eos=False)
    plain = text_gen.generate(REPEATS, **kw)
    spec = text_gen.generate(REPEATS, speculative="prompt-lookup", **kw)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    stream = text_gen.stream(REPEATS, speculative="prompt-lookup", **kw)
    assert "".join(stream) == plain.text and stream.result.token_ids == plain.token_ids


def test_stop_strings_logprobs_and_penalty_compose(text_gen):
    """The call's own pipeline chooses every token from the true prefix's logits, so stop strings,
    logprobs and the repetition penalty give what they give without speculation."""
    prompt = text_gen.encode(REPEATS)
    free, _ = run(text_gen, prompt, max_new_tokens=40, eos=False)
    stop = text_gen.decode(free.token_ids)[10:13]
    for kw in (dict(stop=[stop]), dict(logprobs=3), dict(repetition_penalty=1.3)):
        plain, _ = run(text_gen, prompt, max_new_tokens=40, eos=False, **kw)
        spec, loop = run(text_gen, prompt, loop=lookup_loop(text_gen, prompt, 40), max_new_tokens=40, eos=False, **kw)
        assert (spec.token_ids, spec.text, spec.finish_reason, spec.stop_reason) == (
            plain.token_ids, plain.text, plain.finish_reason, plain.stop_reason)
        assert loop.rounds > 0
        if "logprobs" in kw:
            for a, b in zip(spec.logprobs, plain.logprobs):
                assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert abs(a.logprob - b.logprob) < 1e-4
    assert plain.finish_reason == "length" and run(text_gen, prompt, max_new_tokens=40, stop=[stop])[0].stop_reason


def test_constraint_composes(text_gen):
    """A regex constraint masks each step's logits inside the call: draft tokens it forbids are
    simply not chosen, and the output is the constrained output without speculation."""
    pytest.importorskip("llguidance")
    prompt = text_gen.encode(REPEATS)
    kw = dict(max_new_tokens=40, regex=r"( ?(cat|sat|on|the|mat)){1,12}\.")
    plain, _ = run(text_gen, prompt, **kw)
    spec, loop = run(text_gen, prompt, loop=lookup_loop(text_gen, prompt, 40), **kw)
    assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason == "stop"
    assert loop.rounds > 0


def test_seeded_sampling_gives_the_same_tokens(text_gen):
    prompt = text_gen.encode(REPEATS)
    for seed in range(4):
        kw = dict(max_new_tokens=32, eos=False, temperature=0.8, top_p=0.95, seed=seed)
        plain, _ = run(text_gen, prompt, **kw)
        spec, loop = run(text_gen, prompt, loop=lookup_loop(text_gen, prompt, 32), **kw)
        assert spec.token_ids == plain.token_ids and loop.rounds > 0


def test_sampled_distribution_unchanged(text_gen):
    """Frequencies of tokens 3-6 over 300 seeds with speculation vs 300 other seeds without.

    Per token id and position, |f_spec - f_plain| <= 4.5 * sqrt(2 p (1 - p) / N) + 1/N (p the pooled
    frequency): a two-sample binomial bound at 4.5 standard deviations, so across the ~400 (id,
    position) pairs a correct sampler fails by chance with probability below 1e-3 (and the seeds
    are fixed, so the test is deterministic). A sampler that took every draft token, or never
    resampled after a rejection, moves the repeated tokens' frequencies by far more than that."""
    prompt = text_gen.encode("ab ab ab ab ab ab ab a")
    n = 300
    positions = slice(2, 6)
    kw = dict(max_new_tokens=6, eos=False, temperature=1.0)
    plain = np.array([run(text_gen, prompt, seed=s, **kw)[0].token_ids[positions] for s in range(n)])
    spec, rounds, accepted, drafted = [], 0, 0, 0
    for s in range(n, 2 * n):
        res, loop = run(text_gen, prompt, loop=lookup_loop(text_gen, prompt, 6), seed=s, **kw)
        spec.append(res.token_ids[positions])
        rounds, accepted, drafted = rounds + loop.rounds, accepted + loop.accepted, drafted + loop.drafted
    spec = np.array(spec)
    assert rounds > n and 0 < accepted < drafted            # drafts both accepted and rejected
    for j in range(spec.shape[1]):
        ids = np.union1d(spec[:, j], plain[:, j])
        f_spec = np.array([(spec[:, j] == i).mean() for i in ids])
        f_plain = np.array([(plain[:, j] == i).mean() for i in ids])
        pooled = (f_spec + f_plain) / 2
        bound = 4.5 * np.sqrt(2 * pooled * (1 - pooled) / n) + 1 / n
        assert (np.abs(f_spec - f_plain) <= bound).all(), (j, ids, f_spec, f_plain)


def test_draft_model_kept_in_step(text_folders, text_gen, tmp_path):
    """An int8 export of the same model drafts for the fp32 one: identical greedy tokens, fewer
    passes of the target; the draft's cache holds a prefix of the target's context."""
    from edgellama.quant.api import quantize_folder
    from edgellama.runtime.speculative import DraftModel

    draft = Generator(quantize_folder(text_folders["static"], tmp_path / "int8", mode="int8"), provider="cpu")
    prompt = text_gen.encode(REPEATS)
    plain, _ = run(text_gen, prompt, max_new_tokens=48, eos=False)
    drafter = DraftModel(draft, target=text_gen.model, target_tokenizer=text_gen.tokenizer, capacity=128)
    loop = SpeculativeLoop(text_gen.model, drafter=drafter, capacity=len(prompt) + 48, switch=always_drafting(4))
    spec, loop = run(text_gen, prompt, loop=loop, max_new_tokens=48, eos=False)
    assert spec.token_ids == plain.token_ids
    assert loop.forwards < len(plain.token_ids) and loop.accepted > 0
    context = prompt + plain.token_ids
    assert drafter.fed == context[:len(drafter.fed)] and drafter.cache.lengths[0] == len(drafter.fed)
    assert text_gen.generate_ids(prompt, max_new_tokens=24, eos=False, speculative=draft)[0].token_ids == \
        plain.token_ids[:24]


def test_draft_model_with_another_vocabulary_is_refused(text_folders, text_gen, tmp_path):
    from edgellama.export.onnx_export import export_model

    hf = shutil.copytree(text_folders["hf"], tmp_path / "hf")
    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    other = export_model(str(hf), tmp_path / "other", target="ort", force=True)
    with pytest.raises(RuntimeInputError, match="the draft model's vocabulary .* differs"):
        text_gen.generate("hi", max_new_tokens=4, speculative=str(other))


def test_switch_turns_drafting_off_when_it_does_not_pay_and_probes_again():
    s = Switch(num_draft=8, beta=0.1, cooldown=4)
    assert s.length(100) == 0                      # a plain step is measured first
    s.plain_step(1.0)
    assert s.length(100) == PROBE and s.length(2) == 2
    s.round(drafted=3, accepted=3, seconds=1.3)    # beta measured (1.3 - 1) / 3 = 0.1; all accepted: longer
    assert s.length(100) == 5
    grown = [5]
    while grown[-1] < 8:                           # accepted whole: longer each round, up to num_draft
        s.round(drafted=grown[-1], accepted=grown[-1], seconds=1 + 0.1 * grown[-1])
        grown.append(s.length(100))
    assert grown == sorted(grown) and len(grown) < 10 and s.length(100) == 8
    s.round(drafted=8, accepted=0, seconds=1.8)    # one miss: the running mean still pays
    assert 0 < s.length(100) < 8
    lengths = []
    while s.off_for == 0:                          # misses only: shorter drafts, then off
        lengths.append(s.length(100))
        s.round(drafted=lengths[-1], accepted=0, seconds=1 + 0.1 * lengths[-1])
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] == 2 and len(lengths) < 15
    assert [s.length(100) for _ in range(5)] == [0, 0, 0, 0, PROBE]     # off for 4 steps, then a probe
    s.round(drafted=PROBE, accepted=0, seconds=1.3)
    assert [s.length(100) for _ in range(9)] == [0] * 8 + [PROBE]       # the next cool-down doubled
    s.round(drafted=PROBE, accepted=3, seconds=1.3)                     # a probe that pays: on again
    assert s.length(100) == 5 and s.cooldown == 4
    costly = Switch(num_draft=8, beta=0.1)
    costly.plain_step(1.0)
    costly.round(drafted=8, accepted=2, seconds=5.0)   # verify costs 5 steps: 2 accepted do not pay
    assert costly.length(100) == 0 and costly.beta == 0.5


def test_refusals(text_gen, tiny_static):
    with pytest.raises(RuntimeInputError, match="one prompt \\(batch 1\\)"):
        text_gen.generate_ids([[5, 6], [7, 8]], max_new_tokens=4, speculative="prompt-lookup")
    with pytest.raises(RuntimeInputError, match="speculative takes None"):
        text_gen.generate("hi", max_new_tokens=4, speculative=3)
    with pytest.raises(ModelFolderError, match="n-gram is not a model folder"):   # a str other than prompt-lookup
        text_gen.generate("hi", max_new_tokens=4, speculative="n-gram")
    with pytest.raises(RuntimeInputError, match="num_draft must be a positive integer"):
        SpeculativeLoop(text_gen.model, drafter=PromptLookup(), capacity=8, num_draft=0)
    with pytest.raises(RuntimeInputError, match="cannot rewind 99 tokens"):
        lookup_loop(text_gen, [5], 4).rewind(99)


def test_dynamic_folder_is_refused(text_folders):
    gen = Generator(text_folders["dynamic"], provider="cpu")
    with pytest.raises(RuntimeInputError, match="needs the static KV cache contract"):
        gen.generate("hi", max_new_tokens=4, speculative="prompt-lookup")
