"""The decode step's two paths (call.py): a bare choice when the call asks for nothing else, the whole
pipeline otherwise. Both must choose the same tokens, on both KV cache contracts, with rows that
stop early in a batch; an ONNX Runtime failure in a step is still one typed error."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.errors import RuntimeInputError
from edgellama.runtime.generator import Generator

from tests.conftest import shared_export

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42]]


@pytest.fixture(scope="module", params=["static", "dynamic"])
def gen(request, tmp_path_factory):
    pytest.importorskip("torch")
    return Generator(shared_export(tmp_path_factory, "tiny", target="ort", kv_cache=request.param), provider="cpu")


def test_bare_steps_choose_what_the_whole_pipeline_chooses(gen):
    for kw in (dict(), dict(temperature=1.3, top_k=40, seed=3)):
        bare = gen.generate_ids(PROMPTS, max_new_tokens=12, eos=False, **kw)
        # logprobs sends every step through the whole pipeline (it reads the raw logits there).
        full = gen.generate_ids(PROMPTS, max_new_tokens=12, eos=False, logprobs=0, **kw)
        assert [r.token_ids for r in bare] == [r.token_ids for r in full]
        assert all(len(r.logprobs) == len(r.token_ids) for r in full)


def test_a_row_that_stops_early_leaves_the_others_as_alone(gen):
    free = [r.token_ids for r in gen.generate_ids(PROMPTS, max_new_tokens=10, eos=False)]
    stop = free[1][2]        # the middle row stops at its third token
    stopping = Generator(gen.model)
    stopping.stop_ids = frozenset({stop})
    batch = stopping.generate_ids(PROMPTS, max_new_tokens=10)
    alone = [stopping.generate_ids(p, max_new_tokens=10)[0] for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert batch[1].token_ids == free[1][:free[1].index(stop) + 1] and batch[1].finish_reason == "stop"
    assert any(r.finish_reason == "length" for r in batch)     # another row went on past the stopped one


def test_a_failing_step_is_one_typed_error(gen, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    session = gen.model.session
    calls = {"n": 0}

    def fail_on_the_third(fail):
        real = type(session)
        method = {"static": real.run_with_iobinding, "dynamic": real.run_with_ort_values}[gen.model.kv_cache]

        def run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise fail
            return method(session, *args, **kwargs)
        return run

    name = "run_with_iobinding" if gen.model.kv_cache == "static" else "run_with_ort_values"
    monkeypatch.setattr(session, name, fail_on_the_third(Fail("the kernel broke")))
    with pytest.raises(RuntimeInputError, match="ONNX Runtime failed to run the model: the kernel broke"):
        gen.generate_ids(PROMPTS[0], max_new_tokens=6, eos=False)
    calls["n"] = 0
    monkeypatch.setattr(session, name, fail_on_the_third(ValueError("not onnxruntime's")))
    with pytest.raises(ValueError, match="not onnxruntime's"):      # anything else passes through as it is
        gen.generate_ids(PROMPTS[0], max_new_tokens=6, eos=False)
    monkeypatch.undo()
    assert len(gen.generate_ids(PROMPTS[0], max_new_tokens=6, eos=False)[0].token_ids) == 6


def test_static_batch_one_steps_keep_lengths_width_and_mask(gen):
    if gen.model.kv_cache != "static":
        pytest.skip("the static cache's mask")
    from edgellama.runtime.static_loop import StaticCache

    cache = StaticCache(gen.model, 1, 32)
    tok = cache.prefill([PROMPTS[0]]).argmax(-1)
    for _ in range(4):
        tok = cache.step(tok).argmax(-1)
    n = len(PROMPTS[0]) + 4
    assert cache.width == n and cache.lengths.tolist() == [n]
    assert cache.mask[0].tolist() == [1] * n + [0] * (cache.capacity - n)
    # One more step after a rewind writes the same slot again: width, lengths and mask follow.
    cache.rewind(2)
    logits = np.array(cache.step(tok))
    assert cache.width == n - 1 and cache.mask[0, :n].tolist() == [1] * (n - 1) + [0]
    assert logits.shape == (1, gen.model.config.vocab_size)
