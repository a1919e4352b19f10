"""runtime/sampling.py against transformers' logits warpers, and the properties of the draw."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.errors import RuntimeInputError
from edgellama.runtime.sampling import SamplingParams, filter_logits, next_tokens, stable_argsort
from edgellama.runtime.textstream import TextStream


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.5, 10, 0.9), (1.0, 3, 0.3), (2.0, 0, 0.05)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    warpers = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    logits[0, :4] = logits[0, 10]      # ties at the top-k threshold are kept by both
    ref = torch.from_numpy(logits.copy())
    ids = torch.zeros((3, 1), dtype=torch.long)
    procs = [warpers.TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(warpers.TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(warpers.TopPLogitsWarper(top_p))
    for p in procs:
        ref = p(ids, ref)
    ours = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isinf(ours), torch.isinf(ref).numpy())
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], ref.numpy()[finite], rtol=1e-5)


def test_greedy_is_argmax_with_first_tie():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    assert next_tokens(logits, SamplingParams(), None).tolist() == [1, 0]
    assert next_tokens(logits, SamplingParams(temperature=0.9, top_k=1), None).tolist() == [1, 0]


def test_sampling_is_seeded_and_stays_inside_the_filter():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 100))
    params = SamplingParams(temperature=1.0, top_k=7)
    allowed = [set(np.argsort(-row)[:7]) for row in logits]
    a = [next_tokens(logits, params, np.random.default_rng(5)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    draws = np.array([next_tokens(logits, params, g) for g in [np.random.default_rng(9)] for _ in range(300)])
    for col, ok in enumerate(allowed):
        assert set(draws[:, col]) <= ok
        assert len(set(draws[:, col])) > 2   # actually random, not greedy


def test_sampling_frequencies_follow_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-12]]))
    g = np.random.default_rng(3)
    draws = np.array([next_tokens(logits, SamplingParams(temperature=1.0), g)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq[:3], [0.5, 0.3, 0.2], atol=0.03)
    assert freq[3] == 0


@pytest.mark.parametrize("kwargs,match", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                          ({"top_k": 1.5}, "top_k"), ({"top_p": 0}, "top_p"),
                                          ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature")])
def test_bad_parameters_are_typed_errors(kwargs, match):
    with pytest.raises(RuntimeInputError, match=match):
        SamplingParams(**kwargs)


def test_text_stream_never_splits_a_character():
    # A byte-level toy vocabulary: each token is one byte of UTF-8.
    text = "héllo → 世界 🙂!"
    data = text.encode()

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(decode)
    pieces = [stream.push(b) for b in data]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5      # it streams, not one piece at the end


def test_text_stream_flushes_an_incomplete_tail():
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert stream.push(ord("a")) == "a"
    assert stream.push(0xE4) == ""          # first byte of a 3-byte character
    assert stream.flush() == "\ufffd"


def _awkward_values(rng, n, kind):
    """Float32 values with the cases a bit-level sort key could get wrong."""
    if kind == "normal":
        return (rng.standard_normal(n) * 3).astype(np.float32)
    if kind == "ties":                                   # few distinct values, signed zeros among them
        v = np.round(rng.standard_normal(n), 1).astype(np.float32)
        v[rng.random(n) < 0.3] = -0.0
        return v
    v = np.zeros(n, np.float32)                          # extremes: denormals both sides, the largest floats
    for value, share in ((1.5, 0.1), (1e-45, 0.1), (-1e-45, 0.1), (3.4e38, 0.05), (-3.4e38, 0.05), (-2.0, 0.1)):
        v[rng.random(n) < share] = np.float32(value)
    return v


@pytest.mark.parametrize("kind", ["normal", "ties", "extremes"])
def test_stable_argsort_is_numpys_stable_argsort(kind):
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 300, 5000):
        v = _awkward_values(rng, n, kind)
        with np.errstate(over="ignore"):                 # float16: the largest floats become +-inf
            half = v.astype(np.float16)
        for values in (v, v.astype(np.float64), half):
            want = np.argsort(values, kind="stable")
            assert np.array_equal(stable_argsort(values), want), (kind, n, values.dtype)


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_top_p_on_float32_logits_equals_the_float64_path(kind):
    # float32 logits sort on their own bits, float64 ones through numpy's stable sort: same result.
    rng = np.random.default_rng(6)
    logits = np.stack([_awkward_values(rng, 3000, kind) for _ in range(3)])
    for params in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.5),
                   SamplingParams(temperature=1.3, top_k=200, top_p=0.8)):
        fast = filter_logits(logits, params)
        assert np.array_equal(fast, filter_logits(logits.astype(np.float64), params))
        assert np.isfinite(fast).sum(axis=1).min() >= 1
