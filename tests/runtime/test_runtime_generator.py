"""runtime/generator.py on the toy contract model: cache loop vs full recompute, the three KV loop
modes, left-padded batches, stop tokens, length caps, seeds, threads, typed errors."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from edgellama.errors import RuntimeInputError
from edgellama.runtime import kv_loop
from edgellama.runtime.generator import Generator
from edgellama.runtime.session import OrtModel

from tests.conftest import build_toy, toy_reference


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("gen") / "model", seed=4)


@pytest.fixture(scope="module")
def model(toy):
    return OrtModel(toy, provider="cpu")


def recompute_greedy(toy, ids, n, stop=()):
    """Greedy tokens by re-running the whole sequence each step (no cache): the reference."""
    ids = list(ids)
    out = []
    for _ in range(n):
        arr = np.array([ids])
        t = int(toy_reference(arr, np.ones_like(arr), toy)[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t in stop:
            break
    return out


@pytest.mark.parametrize("mode", kv_loop.MODES)
def test_cache_loop_matches_recompute(toy, model, mode):
    gen = Generator(model, loop=mode)
    res = gen.generate_ids([5, 7, 9], max_new_tokens=12, eos=False)[0]
    assert res.token_ids == recompute_greedy(toy, [5, 7, 9], 12)
    assert res.finish_reason == "length" and res.prompt_tokens == 3 and res.prefill_ms > 0


def test_modes_agree_on_a_sampled_batch(model):
    outs = [[r.token_ids for r in Generator(model, loop=mode).generate_ids(
        [[3, 4, 5, 6], [8]], max_new_tokens=10, temperature=1.2, top_p=0.9, seed=11, eos=False)]
        for mode in kv_loop.MODES]
    assert outs[0] == outs[1] == outs[2]


def test_left_padded_batch_equals_rows_alone(model):
    gen = Generator(model)
    prompts = [[3, 4, 5, 6, 7], [9], [1, 10, 4]]
    batch = gen.generate_ids(prompts, max_new_tokens=8, eos=False)
    alone = [gen.generate_ids(p, max_new_tokens=8, eos=False)[0] for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


def test_stop_token_ends_a_row(toy, model):
    gen = Generator(model)
    free = gen.generate_ids([5, 7, 9], max_new_tokens=20, eos=False)[0].token_ids
    stop_tok = free[3]
    gen.stop_ids = frozenset({stop_tok})
    res = gen.generate_ids([5, 7, 9], max_new_tokens=20)[0]
    first = free.index(stop_tok)
    assert res.token_ids == free[:first + 1] and res.finish_reason == "stop"


def test_context_caps_the_length_and_long_prompts_are_refused(model):
    gen = Generator(model)
    ctx = model.max_positions                          # 32 in the toy
    res = gen.generate_ids(list(range(3, 11)) * 3, max_new_tokens=100, eos=False)[0]   # 24-token prompt
    assert len(res.token_ids) == ctx - 24 and res.finish_reason == "length"
    with pytest.raises(RuntimeInputError, match=f"the prompt has {ctx} tokens; the model's context is {ctx}"):
        gen.generate_ids([3] * ctx, max_new_tokens=1)


@pytest.mark.parametrize("bad,match", [([3, 99], "token id 99 is outside the vocabulary"),
                                       ([-4], "token id -4 is outside"), ([[]], "empty prompt"),
                                       ([], "empty prompt"), (["a"], "token ids must be integers")])
def test_bad_prompts_are_typed_errors(model, bad, match):
    with pytest.raises(RuntimeInputError, match=match):
        Generator(model).generate_ids(bad, max_new_tokens=2)


def test_bad_settings_are_typed_errors(model):
    gen = Generator(model)
    with pytest.raises(RuntimeInputError, match="max_new_tokens"):
        gen.generate_ids([3], max_new_tokens=0)
    with pytest.raises(RuntimeInputError, match="top_p"):
        gen.generate_ids([3], top_p=2.0)
    with pytest.raises(RuntimeInputError, match="unknown KV loop mode"):
        Generator(model, loop="magic")


def test_seed_reproduces_and_differs(model):
    gen = Generator(model)
    kw = dict(max_new_tokens=15, temperature=1.5, eos=False)
    a = gen.generate_ids([4, 5], seed=1, **kw)[0]
    b = gen.generate_ids([4, 5], seed=1, **kw)[0]
    runs = {tuple(gen.generate_ids([4, 5], seed=s, **kw)[0].token_ids) for s in range(2, 8)}
    assert a.token_ids == b.token_ids and a.seed == 1
    assert len(runs) > 1
    c = gen.generate_ids([4, 5], **kw)[0]        # no seed: one is drawn and reported
    assert isinstance(c.seed, int) and gen.generate_ids([4, 5], seed=c.seed, **kw)[0].token_ids == c.token_ids


@pytest.mark.parametrize("mode", ["ortvalue", "iobinding"])
def test_threads_share_one_generator(model, mode):
    gen = Generator(model, loop=mode)
    jobs = [([3 + i % 5, 4, 5 + i % 3], dict(max_new_tokens=12, temperature=1.0 if i % 2 else 0.0, seed=i,
                                             eos=False)) for i in range(12)]
    serial = [gen.generate_ids(p, **kw)[0].token_ids for p, kw in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(lambda p=p, kw=kw: gen.generate_ids(p, **kw)[0].token_ids) for p, kw in jobs]
        threaded = [f.result() for f in futures]
    assert threaded == serial


def test_timings_are_reported(model):
    res = Generator(model).generate_ids([3, 4], max_new_tokens=6, eos=False)[0]
    d = res.to_dict()
    assert {"text", "token_ids", "prefill_ms", "decode_tokens_per_s", "finish_reason"} <= set(d)
    assert d["decode_tokens_per_s"] > 0 and d["decode_ms"] > 0
    one = Generator(model).generate_ids([3, 4], max_new_tokens=1, eos=False)[0]
    assert len(one.token_ids) == 1 and one.decode_tokens_per_s == 0.0


def test_public_names_import_from_the_package():
    import edgellama.runtime as rt
    from edgellama.runtime import Generator as G
    from edgellama.runtime.generator import Generator

    assert G is Generator and set(rt.__all__) >= {"Generator", "SamplingParams"}
    with pytest.raises(AttributeError):
        rt.NotAName  # noqa: B018
    # parity is the CI layer's: edgellama.check, not the embeddable runtime
    from edgellama.check import run_parity
    from edgellama.check.parity import run_parity as rp

    assert run_parity is rp and "run_parity" not in rt.__all__
