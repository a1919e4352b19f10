"""The static KV cache contract at runtime (runtime/static_loop.py, the Generator's static loop): the
same tokens as the dynamic contract, batches (left- and right-padded) equal to rows alone, stop
tokens, sampling and threads as today, overflow grown or refused, quantized static folders,
onnxruntime-genai on a static folder, and tools that need the dynamic contract saying so."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest

from edgellama.errors import RuntimeInputError
from edgellama.folder import verify_folder
from edgellama.runtime import kv_loop
from edgellama.runtime.generator import Generator
from edgellama.runtime.session import OrtModel
from edgellama.runtime.static_loop import StaticCache, buffer_slots
from tests.conftest import shared_export

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42]]


def _export(tmp_path_factory, *, kv_cache, dtype="fp32", source="tiny"):
    # The session's shared folder of these options (read only here).
    return shared_export(tmp_path_factory, source, target="ort", dtype=dtype, kv_cache=kv_cache)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def pair(request, tmp_path_factory):
    """(static, dynamic) ort folders of tiny in one dtype."""
    pytest.importorskip("torch")
    return (_export(tmp_path_factory, kv_cache=None, dtype=request.param),
            _export(tmp_path_factory, kv_cache="dynamic", dtype=request.param))


@pytest.fixture(scope="module")
def static_gen(pair):
    return Generator(pair[0], provider="cpu")


def tokens(results):
    return [r.token_ids for r in results]


def test_folder_records_the_contract(pair):
    static, dynamic = pair
    m = json.loads((static / "edgellama.json").read_text())
    assert m["kv_cache"] == "static" and json.loads((dynamic / "edgellama.json").read_text())["kv_cache"] == "dynamic"
    assert "position_ids" not in [i["name"] for i in m["io"]["inputs"]]
    genai = json.loads((static / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in genai["model"]["decoder"]["inputs"]
    assert Generator(static, provider="cpu").loop_mode == "static"


def test_greedy_equals_the_dynamic_contract(pair, static_gen):
    dyn = Generator(pair[1], provider="cpu")
    for prompt in PROMPTS:
        assert (tokens(static_gen.generate_ids(prompt, max_new_tokens=24, eos=False))
                == tokens(dyn.generate_ids(prompt, max_new_tokens=24, eos=False)))


def test_left_padded_batch_of_three_equals_rows_alone(static_gen):
    batch = tokens(static_gen.generate_ids(PROMPTS, max_new_tokens=12, eos=False))
    alone = [static_gen.generate_ids(p, max_new_tokens=12, eos=False)[0].token_ids for p in PROMPTS]
    assert batch == alone


def test_right_padded_batch_of_three_equals_rows_alone(static_gen):
    model = static_gen.model

    def greedy(rows, n=10):
        cache = StaticCache(model, len(rows), max(map(len, rows)) + n)
        tok = cache.prefill(rows).argmax(-1)
        out = [tok]
        for _ in range(n - 1):
            tok = cache.step(tok).argmax(-1)
            out.append(tok)
        return np.stack(out, 1).tolist()

    batch = greedy(PROMPTS)
    assert batch == [greedy([p])[0] for p in PROMPTS]


def test_stop_tokens_sampling_and_threads_as_the_dynamic_contract(pair, static_gen):
    dyn = Generator(pair[1], provider="cpu")
    kw = dict(max_new_tokens=12, temperature=1.2, top_p=0.9, seed=11, eos=False)
    assert tokens(static_gen.generate_ids(PROMPTS, **kw)) == tokens(dyn.generate_ids(PROMPTS, **kw))
    free = static_gen.generate_ids(PROMPTS[0], max_new_tokens=20, eos=False)[0].token_ids
    gen = Generator(pair[0], provider="cpu")
    gen.stop_ids = frozenset({free[3]})
    res = gen.generate_ids(PROMPTS[0], max_new_tokens=20)[0]
    assert res.token_ids == free[:free.index(free[3]) + 1] and res.finish_reason == "stop"
    jobs = [([3 + i % 5, 4, 5 + i % 3], dict(max_new_tokens=10, temperature=1.0 if i % 2 else 0.0, seed=i,
                                             eos=False)) for i in range(8)]
    serial = [static_gen.generate_ids(p, **k)[0].token_ids for p, k in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        threaded = [f.result() for f in [pool.submit(lambda p=p, k=k: static_gen.generate_ids(p, **k)[0].token_ids)
                                         for p, k in jobs]]
    assert threaded == serial


def test_buffer_sized_to_the_request_grows_or_refuses(static_gen):
    model = static_gen.model
    assert buffer_slots(10, limit=model.max_positions) == 64 and buffer_slots(300, limit=256) == 300
    assert buffer_slots(100, limit=model.max_positions) == min(128, model.max_positions)
    prompt = PROMPTS[0]
    big = StaticCache(model, 1, 64)
    want = [big.prefill([prompt])[0].copy()] + [big.step(np.array([t]))[0].copy() for t in (3, 4, 5, 6)]
    small = StaticCache(model, 1, len(prompt) + 1, round_to=1)
    assert small.capacity == len(prompt) + 1
    got = [small.prefill([prompt])[0].copy()] + [small.step(np.array([t]))[0].copy() for t in (3, 4, 5, 6)]
    assert small.capacity > len(prompt) + 1
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    fixed = StaticCache(model, 1, len(prompt) + 1, grow=False, round_to=1)
    fixed.prefill([prompt])
    fixed.step(np.array([3]))
    with pytest.raises(RuntimeInputError, match=r"needs 9 cache slots; its buffer holds 8 \(growing is off\)"):
        fixed.step(np.array([4]))
    with pytest.raises(RuntimeInputError, match="the model's context is"):
        StaticCache(model, 1, model.max_positions + 1)


def test_dynamic_only_tools_say_so(pair, static_gen):
    with pytest.raises(RuntimeInputError, match="static KV cache contract .* forward needs the dynamic one"):
        static_gen.model.forward(np.array([[3]]), np.ones((1, 1)), np.zeros((1, 1)), static_gen.model.empty_past(1))
    with pytest.raises(RuntimeInputError, match="does not fit .* static KV cache contract"):
        Generator(static_gen.model, loop="ortvalue")
    with pytest.raises(RuntimeInputError, match="does not fit .* dynamic KV cache contract"):
        Generator(OrtModel(pair[1], provider="cpu"), loop=kv_loop.STATIC)
    with pytest.raises(RuntimeInputError, match="dynamic KV cache contract; the static cache needs"):
        StaticCache(OrtModel(pair[1], provider="cpu"), 1, 8)


# At fp32 activations (accuracy_level 0): the quantized weights are byte-identical in both contracts,
# but at the default level 4 each MatMulNBits rounds its input to int8 per block, so the two graphs'
# ~1e-7 differences in attention's output (rotary inside GroupQueryAttention or before it) can land
# a value on the other side of a rounding step, and on this random tiny model a near-tie then flips
# (at level 4: int8 4, int4 2, int4-fast 7 of 24 tokens differ; at level 0 none). Level 4 itself
# is exercised on static folders by the genai and int4-fast tests.
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-fast"])
def test_quantized_static_folder(pair, tmp_path, mode):
    from edgellama.quant.api import quantize_folder

    static, dynamic = pair
    if json.loads((static / "edgellama.json").read_text())["dtype"] != "fp32":
        pytest.skip("quantization starts from fp32")
    out_s = quantize_folder(static, tmp_path / "s", mode=mode, accuracy_level=0)
    out_d = quantize_folder(dynamic, tmp_path / "d", mode=mode, accuracy_level=0)
    assert json.loads((out_s / "edgellama.json").read_text())["kv_cache"] == "static"
    gen_s, gen_d = Generator(out_s, provider="cpu"), Generator(out_d, provider="cpu")
    assert gen_s.loop_mode == "static"
    got = gen_s.generate_ids(PROMPTS, max_new_tokens=8, eos=False)
    assert all(len(r.token_ids) == 8 for r in got)
    # The same weights and smoothing: the same tokens. int4 keeps the packed q|k|v's v columns at
    # 8 bits, as the dynamic graph keeps v_proj.
    assert tokens(got) == tokens(gen_d.generate_ids(PROMPTS, max_new_tokens=8, eos=False))
    if mode == "int4":
        record = json.loads((out_s / "edgellama.json").read_text())["quantization"][0]
        layers = json.loads((static / "edgellama.json").read_text())["config"]["num_hidden_layers"]
        assert len([m for m in record["int8_matmuls"] if m.endswith("qkv_proj[v]")]) == layers
    # At the default level (SmoothQuant calibrated on each contract's own graph, lm_head's smoothing
    # folded through the static graph's last-position pick) the quantized tensors are the same bytes.
    lvl4 = [quantize_folder(f, tmp_path / f"{f.name}-4", mode=mode) for f in (static, dynamic)]
    smoothing = [json.loads((q / "edgellama.json").read_text())["quantization"][0]["smoothing"] for q in lvl4]
    assert smoothing[0] == smoothing[1]
    assert _quantized_tensors(lvl4[0]) == _quantized_tensors(lvl4[1])


def _quantized_tensors(folder) -> list[str]:
    """sha256 of every initializer a MatMulNBits or GatherBlockQuantized reads, sorted (the two
    contracts name the packed q|k|v differently)."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    model = onnx.load(folder / "model.onnx")
    init = {t.name: t for t in model.graph.initializer}
    return sorted(hashlib.sha256(numpy_helper.to_array(init[name]).tobytes()).hexdigest()
                  for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                  for name in n.input[1:] if name in init)


@pytest.mark.genai
def test_genai_greedy_equals_ours_on_a_static_folder(pair):
    pytest.importorskip("onnxruntime_genai")
    from tests.check.test_genai import assert_genai_greedy_equals_ours

    assert_genai_greedy_equals_ours(pair[0])


@pytest.mark.slow
def test_smollm2_fp32_greedy_64_tokens_equals_the_dynamic_contract(tmp_path_factory):
    static = Generator(_export(tmp_path_factory, kv_cache="static", source="smollm2"), provider="cpu")
    dynamic = Generator(_export(tmp_path_factory, kv_cache="dynamic", source="smollm2"), provider="cpu")
    prompt = static.encode("The capital of France is Paris. The capital of Germany is")
    assert (tokens(static.generate_ids(prompt, max_new_tokens=64, eos=False))
            == tokens(dynamic.generate_ids(prompt, max_new_tokens=64, eos=False)))


def test_parity_of_a_static_folder_against_torch(pair):
    """check/parity runs a static folder through its own loop: fp32 tolerances pass, and the block
    probes (rotary fused into attention: not compared) localize on it."""
    from edgellama.check import parity
    from edgellama.check.parity_sides import OrtSide

    static = pair[0]
    if json.loads((static / "edgellama.json").read_text())["dtype"] != "fp32":
        pytest.skip("fp32 tolerances")
    report = parity.run_parity(static, reference="torch", decode_steps=4)
    assert report["status"] == "pass" and report["comparisons"][0]["greedy"]["match_fraction"] == 1.0
    ref = parity.load_torch_reference(verify_folder(static), folder=static)
    cand = OrtSide(static, provider="cpu")
    config = cand.config
    batch = parity.make_batches(parity.encode_prompts(list(parity.DEFAULT_PROMPTS), folder=static, config=config),
                                pad_id=0)[-1]
    found = parity.localize(ref, cand, batch, steps=2, block_rel=1e-3, n_layers=config.num_hidden_layers)
    compared = {row["key"] for row in found["blocks"] if row["compared"]}
    assert "layers.0.attention" in compared and "norm" in compared and found["first_failing"] is None


def test_rewind_then_the_same_tokens_give_the_same_logits(static_gen):
    """A rewound cache continues as if the dropped tokens had never been fed: the same step after
    a rewind gives bit-identical logits, and greedy from there equals a fresh cache's greedy."""
    model = static_gen.model
    prompt = PROMPTS[0]
    cache = StaticCache(model, 1, 32)
    cache.prefill([prompt])
    first = cache.step(np.array([3]))[0].copy()
    cache.step(np.array([4]))
    cache.step(np.array([5]))
    cache.rewind(3)
    assert cache.lengths.tolist() == [len(prompt)] and cache.width == len(prompt)
    assert cache.mask[0].tolist() == [1] * len(prompt) + [0] * (cache.capacity - len(prompt))
    np.testing.assert_array_equal(cache.step(np.array([3]))[0], first)
    fresh = StaticCache(model, 1, 32)
    fresh.prefill([prompt])
    fresh.step(np.array([3]))
    tok_a, tok_b = np.array([9]), np.array([9])
    for _ in range(6):
        la, lb = cache.step(tok_a)[0].copy(), fresh.step(tok_b)[0].copy()
        np.testing.assert_array_equal(la, lb)
        tok_a, tok_b = la.argmax(keepdims=True), lb.argmax(keepdims=True)


def test_rewind_per_row_and_past_the_start(static_gen):
    model = static_gen.model
    rows = [PROMPTS[0], PROMPTS[2]]
    cache = StaticCache(model, 2, 32)
    cache.prefill(rows)
    cache.step(np.array([3, 4]))
    cache.rewind([1, 0])
    assert cache.lengths.tolist() == [len(rows[0]), len(rows[1]) + 1] and cache.width == len(rows[0])
    got = cache.step(np.array([6, 7]))
    alone = StaticCache(model, 1, 32)
    alone.prefill([rows[0]])
    np.testing.assert_allclose(got[0], alone.step(np.array([6]))[0], rtol=1e-4, atol=1e-4)
    before = (cache.lengths.copy(), cache.mask.copy(), cache.width)
    for bad in ([0, 99], -1, 99, [1, 1, 1]):
        with pytest.raises(RuntimeInputError, match="rewind"):
            cache.rewind(bad)
        assert (cache.lengths.tolist(), cache.mask.tolist(), cache.width) == (
            before[0].tolist(), before[1].tolist(), before[2])
    cache.rewind(cache.lengths.tolist())
    assert cache.width == 0 and not cache.mask.any()


def test_append_keeps_the_last_k_positions_in_one_call(static_gen):
    """append(rows, keep=K) returns [B, K, V]: a chunk's last K positions, the same as feeding its
    tokens one step at a time; on a graph edited to return every position (parity's), the same
    positions picked on the host; a K past the chunk repeats its first; the next step reads one
    position again."""
    from edgellama import folder as model_folder
    from edgellama.check.parity_sides import full_logits

    model = static_gen.model
    prompt, chunk = PROMPTS[0], [3, 4, 5, 6]
    one_by_one = StaticCache(model, 1, 32)
    one_by_one.prefill([prompt])
    want = np.stack([one_by_one.step(np.array([t]))[0].copy() for t in chunk])
    cache = StaticCache(model, 1, 32)
    assert cache.keeps
    cache.prefill([prompt])
    got = cache.append([chunk], keep=3)
    assert got.shape == (1, 3, model.config.vocab_size)
    np.testing.assert_allclose(got[0], want[1:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(cache.step(np.array([7]))[0], one_by_one.step(np.array([7]))[0], atol=1e-4, rtol=0)
    cache.rewind(5)
    clamped = cache.append([chunk], keep=6)[0]
    np.testing.assert_array_equal(clamped[:3], np.repeat(clamped[2:3], 3, axis=0))
    np.testing.assert_allclose(clamped[2:], want, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeInputError, match="cannot keep the logits of 0 positions"):
        cache.append([[3]], keep=0)

    full = OrtModel(model.folder, provider="cpu",
                    proto=full_logits(model_folder.load_model_proto(model.folder, with_weights=False)))
    rows = [PROMPTS[0], PROMPTS[2]]
    on_host = StaticCache(full, 2, 32)
    in_graph = StaticCache(model, 2, 32)
    assert not on_host.last_only and in_graph.last_only
    np.testing.assert_allclose(on_host.append(rows, keep=4), in_graph.append(rows, keep=4), atol=1e-5, rtol=0)
