"""runtime/generator.py on the toy contract model: cache loop vs full recompute, the three KV loop
modes, left-padded batches, stop tokens, length caps, seeds, threads, typed errors."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from edgellama.errors import ModelFolderError, RuntimeInputError
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


# -- issue 14: options, results, streams ----------------------------------------------------------
def softmax_log(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.8, "seed": 3, "repetition_penalty": 1.7}])
def test_logprobs_are_the_raw_model_log_softmax(toy, model, extra):
    res = Generator(model).generate_ids([5, 7, 9], max_new_tokens=8, eos=False, logprobs=3, **extra)[0]
    ids = [5, 7, 9]
    assert len(res.logprobs) == len(res.token_ids) == 8
    for t, lp in zip(res.token_ids, res.logprobs):
        arr = np.array([ids])
        ref = softmax_log(toy_reference(arr, np.ones_like(arr), toy)[0, -1])
        order = np.argsort(-ref, kind="stable")[:3]
        assert lp.token_id == t and lp.logprob == pytest.approx(ref[t], abs=1e-4)
        assert [i for i, _ in lp.top] == order.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], ref[order], atol=1e-4)
        ids.append(t)


def test_repetition_penalty_equals_transformers(text_folders):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.AutoModelForCausalLM.from_pretrained(text_folders["hf"])
    gen = Generator(text_folders["dynamic"], provider="cpu")
    ids = gen.encode("The cat sat", chat=True)
    plain = gen.generate_ids(ids, max_new_tokens=24, eos=False)[0].token_ids
    for penalty in (1.3, 2.0, 0.7):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                              eos_token_id=None, pad_token_id=0)
        ours = gen.generate_ids(ids, max_new_tokens=24, eos=False, repetition_penalty=penalty)[0].token_ids
        assert ours == out[0, len(ids):].tolist()
        assert ours != plain                                  # the penalty changed the answer


def test_generation_config_gives_defaults_and_arguments_win(tmp_path):
    import json
    import warnings

    folder = build_toy(tmp_path / "toy", seed=4)
    plain = Generator(folder, provider="cpu")
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.9, "top_k": 5, "repetition_penalty": 1.2, "eos_token_id": [7, 2]}))
    gen = Generator(folder, provider="cpu")
    assert gen.generation_defaults == {"temperature": 0.9, "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.2}
    assert 7 in gen.stop_ids and 7 not in plain.stop_ids
    r = gen.generate_ids([3, 4], max_new_tokens=10, seed=5, eos=False)[0]
    assert r.defaults == ["repetition_penalty", "temperature", "top_k", "top_p"]
    same = plain.generate_ids([3, 4], max_new_tokens=10, seed=5, eos=False, temperature=0.9, top_k=5,
                              repetition_penalty=1.2)[0]
    assert r.token_ids == same.token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = gen.generate_ids([3, 4], max_new_tokens=10, eos=False, temperature=0.0)[0]   # an argument wins
    assert "temperature" not in g.defaults and g.seed is None
    assert g.token_ids == plain.generate_ids([3, 4], max_new_tokens=10, eos=False, repetition_penalty=1.2)[0].token_ids
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": "hot"}))
    with pytest.raises(ModelFolderError, match="temperature must be a number"):
        Generator(folder, provider="cpu")


def test_capped_says_how_much_max_new_tokens_was_cut(model):
    res = Generator(model).generate_ids(list(range(3, 11)) * 3, max_new_tokens=100, eos=False)[0]
    assert res.capped == 100 - (model.max_positions - 24) and res.prefill_tokens == 24
    assert Generator(model).generate_ids([3], max_new_tokens=4, eos=False)[0].capped == 0


def test_eos_result_names_the_token(model):
    gen = Generator(model)
    free = gen.generate_ids([5, 7, 9], max_new_tokens=20, eos=False)[0].token_ids
    gen.stop_ids = frozenset({free[3]})
    res = gen.generate_ids([5, 7, 9], max_new_tokens=20)[0]
    assert (res.finish_reason, res.stop_reason) == ("stop", free[3])


def test_greedy_with_top_p_warns_and_stop_bool_is_deprecated(model):
    gen = Generator(model)
    with pytest.warns(UserWarning, match="top_p with temperature 0: the call is greedy"):
        gen.generate_ids([3], max_new_tokens=2, top_p=0.5)
    with pytest.warns(DeprecationWarning, match="eos="):
        old = gen.generate_ids([5, 7, 9], max_new_tokens=6, stop=False)[0]
    assert old.token_ids == gen.generate_ids([5, 7, 9], max_new_tokens=6, eos=False)[0].token_ids


@pytest.mark.parametrize("kwargs,match", [({"temprature": 1.0}, "unknown generation option 'temprature'"),
                                          ({"repetition_penalty": 0}, "repetition_penalty"),
                                          ({"logprobs": -1}, "logprobs"), ({"eos": "no"}, "eos"),
                                          ({"regex": "a", "grammar": "b"}, "at most one constraint")])
def test_bad_options_are_typed_errors(model, kwargs, match):
    with pytest.raises(RuntimeInputError, match=match):
        Generator(model).generate_ids([3], **kwargs)


def test_options_object_and_overrides(model):
    from edgellama.runtime import GenerationOptions

    gen = Generator(model)
    opts = GenerationOptions(max_new_tokens=5, eos=False, temperature=1.1, seed=2)
    a = gen.generate_ids([4, 5], options=opts)[0]
    b = gen.generate_ids([4, 5], options=opts, seed=2, max_new_tokens=7)[0]
    assert len(a.token_ids) == 5 and b.token_ids[:5] == a.token_ids and len(b.token_ids) == 7


def test_stream_is_an_object_with_a_result(model):
    gen = Generator(model)
    full = gen.generate_ids([5, 7, 9], max_new_tokens=10, eos=False)[0]
    s = gen.stream_ids([5, 7, 9], max_new_tokens=10, eos=False)
    steps = sum(1 for _ in s)                 # no tokenizer: no text, the tokens still run
    assert steps == 0 and s.result.token_ids == full.token_ids and s.result.finish_reason == "length"
    s = gen.stream_ids([5, 7, 9], max_new_tokens=10, eos=False)
    r = s.result                              # read before iterating: the call is closed, nothing ran
    assert r.finish_reason == "cancelled" and r.token_ids == []


def test_stream_text_result_after_a_break_and_the_deprecated_list(text_folders):
    gen = Generator(text_folders["dynamic"], provider="cpu")
    full = gen.generate("The cat sat", max_new_tokens=20, eos=False)
    s = gen.stream("The cat sat", max_new_tokens=20, eos=False)
    got = []
    for piece in s:
        got.append(piece)
        if len(got) == 3:
            break
    r = s.result
    assert r.finish_reason == "cancelled" and r.token_ids == full.token_ids[:len(r.token_ids)]
    assert "".join(got) == r.text and 3 <= len(r.token_ids) < 20
    done = []
    with pytest.warns(DeprecationWarning, match=r"\.result"):
        pieces = list(gen.stream("The cat sat", max_new_tokens=20, eos=False, result=done))
    assert "".join(pieces) == full.text == done[0].text
    with pytest.raises(RuntimeInputError, match="streams one prompt"):
        gen.stream(["a", "b"])


def test_cpu_notice_goes_through_logging(monkeypatch, caplog):
    import logging

    import onnxruntime

    from edgellama.runtime import session as S

    monkeypatch.setattr(S, "cuda_status", lambda: (False, "no GPU in this test"))
    real = onnxruntime.get_available_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: list(dict.fromkeys(["CUDAExecutionProvider", *real()])))
    logger = logging.getLogger("edgellama.runtime.session")
    monkeypatch.setattr(logger, "propagate", True)          # let caplog see it
    with caplog.at_level(logging.WARNING, logger="edgellama"):
        assert S.resolve_provider("auto") == "cpu"
    assert [r.getMessage() for r in caplog.records if "running on CPU" in r.getMessage()]
    caplog.clear()
    package = logging.getLogger("edgellama")
    before = package.level
    package.setLevel(logging.ERROR)                           # an application silences it
    try:
        S.resolve_provider("auto")
    finally:
        package.setLevel(before)
    assert not [r for r in caplog.records if "running on CPU" in r.getMessage()]
