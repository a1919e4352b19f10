"""The quality benchmark's metric code (edgellama.check.quality) on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.check import metrics
from edgellama.check import quality as q


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """The reference formula: exp(mean -log softmax(logits)[target]); logits [N, V], targets [N]."""
    x = logits - logits.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(targets)), targets].mean()))


def _evaluated_perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """evaluate's perplexity of one window whose position t has `logits[t]` and predicts `targets[t]`."""
    ids = np.concatenate([[0], targets])[None].astype(np.int64)
    rows = np.concatenate([logits, np.zeros((1, logits.shape[1]))])[None]  # the last position predicts nothing
    return q.evaluate(lambda _: rows, [ids]).scores.ppl


# -- metrics -----------------------------------------------------------------------------------------
def test_perplexity_of_known_distributions():
    v = 50
    targets = _rng().integers(0, v, size=20)
    assert _evaluated_perplexity(np.zeros((20, v)), targets) == pytest.approx(v)
    # the target always gets probability 1/4: perplexity 4, whatever the rest of the row holds
    logits = np.full((20, v), -np.inf)
    logits[np.arange(20), targets] = 0.0
    logits[np.arange(20), (targets + 1) % v] = np.log(3.0)
    assert _evaluated_perplexity(logits, targets) == pytest.approx(4.0)


def test_kl_zero_for_identical_positive_otherwise():
    a = _rng(1).standard_normal((8, 30)) * 3
    assert np.allclose(metrics.kl_divergence(a, a), 0.0, atol=1e-12)
    assert np.allclose(metrics.kl_divergence(a, a + 5.0), 0.0, atol=1e-12)  # logits shift: same distribution
    b = a + _rng(2).standard_normal((8, 30))
    kl = metrics.kl_divergence(a, b)
    assert kl.shape == (8,) and (kl > 1e-4).all()
    # two-point check against the closed form: P = (1/2, 1/2), Q = (1/4, 3/4)
    p, r = np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])
    want = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, r)[0] == pytest.approx(want)
    assert metrics.kl_divergence(r, p)[0] != pytest.approx(want)  # not symmetric: P is the reference


def test_top1_agreement():
    a = np.eye(4)
    b = np.eye(4)
    b[3] = [1, 0, 0, 0]
    assert metrics.top1_agreement(a, a) == 1.0
    assert metrics.top1_agreement(a, b) == 0.75


# -- windows and evaluate ---------------------------------------------------------------------------
def test_windows_predict_every_token_once():
    ids = list(range(10, 31))  # 21 tokens
    wins = q.make_windows(ids, window=8, bos_id=1)
    assert all(w.shape[1] <= 8 and w[0, 0] == 1 for w in wins)
    assert np.concatenate([w[0, 1:] for w in wins]).tolist() == ids
    no_bos = q.make_windows(ids, window=8, bos_id=None)
    assert [w.shape[1] for w in no_bos] == [8, 8, 5]


def _bigram_fn(table: np.ndarray):
    return lambda ids: table[ids]  # [1, S] -> [1, S, V]: logits depend on the current token only


def test_evaluate_against_reference():
    v = 16
    table = _rng(3).standard_normal((v, v)) * 2
    wins = q.make_windows(_rng(4).integers(2, v, size=100).tolist(), window=32, bos_id=1)
    ref = q.evaluate(_bigram_fn(table), wins, keep_logprobs=True)
    assert ref.scores.tokens == 100 and ref.scores.kl_mean is None and len(ref.logprobs) == len(wins)
    targets = np.concatenate([w[0, 1:] for w in wins])
    inputs = np.concatenate([w[0, :-1] for w in wins])
    assert ref.scores.ppl == pytest.approx(_perplexity(table[inputs], targets))
    same = q.evaluate(_bigram_fn(table.astype(np.float32)), wins, reference=ref.logprobs)
    assert same.scores.kl_mean < 1e-10 and same.scores.top1 == 1.0
    noisy = table + _rng(5).standard_normal(table.shape)
    other = q.evaluate(_bigram_fn(noisy), wins, reference=ref.logprobs)
    assert other.scores.kl_mean == pytest.approx(metrics.kl_divergence(table[inputs], noisy[inputs]).mean())
    assert other.scores.top1 == pytest.approx(metrics.top1_agreement(table[inputs], noisy[inputs]))
    assert other.scores.top1 < 1.0


def test_greedy_answer_stops_and_follows_argmax():
    table = np.full((6, 6), -1.0)
    for i in range(5):
        table[i, i + 1] = 1.0  # each token predicts the next; 5 -> 5 forever unless stopped
    table[5, 5] = 1.0
    assert q.greedy_answer(_bigram_fn(table), [0], max_new_tokens=10, stop_ids=[4]) == [1, 2, 3]
    assert q.greedy_answer(_bigram_fn(table), [2], max_new_tokens=5) == [3, 4, 5, 5, 5]


# -- the text -----------------------------------------------------------------------------------------
def test_text_has_enough_tokens_and_is_deterministic():
    from edgellama.export import config as presets
    from edgellama.export.sources import byte_tokenizer

    tok = byte_tokenizer(presets.tiny())
    text = q.stdlib_text()
    assert q.stdlib_text() == text and "argument" in text
    ids = q.eval_tokens(tok, tokens=4000)
    assert len(ids) == 4000 and q.eval_tokens(tok, tokens=4000) == ids
    with pytest.raises(Exception, match="fewer than"):
        q.eval_tokens(tok, tokens=10 ** 8)


# -- de-gridding ------------------------------------------------------------------------------------
def _quantized(shape, qtype_name, seed):
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    x = _rng(seed).standard_normal(shape).astype(np.float32)
    raw = quantize(x, qtype)
    return raw, dequantize(raw, qtype).astype(np.float32)


def _on_grid(w: np.ndarray, step: np.ndarray) -> float:
    """Largest distance (in steps) of a weight from its block's grid min + k*step."""
    wb, sb = w.reshape(w.shape[0], -1, 32), step.reshape(step.shape[0], -1, 32)
    k = (wb - wb.min(-1, keepdims=True)) / sb
    return float(np.abs(k - np.round(k)).max())


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_block_steps_are_the_grid(qtype):
    raw, w = _quantized((6, 96), qtype, seed=6)
    step = q.block_steps(raw, qtype)
    assert step.shape == w.shape and (step > 0).all()
    assert _on_grid(w, step) < 1e-3
    assert _on_grid(w, step * 0.7) > 0.1  # a wrong step does not pass


def test_degrid_noise_is_bounded_deterministic_and_off_grid():
    raw, w = _quantized((8, 64), "Q4_1", seed=7)
    step = q.block_steps(raw, "Q4_1")
    weights = {"a": w, "norm": np.ones(8, dtype=np.float32)}
    one = q.degrid(weights, {"a": step}, seed=0)
    noise = one["a"] - w
    assert np.all(np.abs(noise) <= step / 2 + 1e-6)
    assert np.abs(noise).max() > 0.4 * step.max()  # it uses the whole half step
    assert np.array_equal(one["norm"], weights["norm"])  # weights without a step are untouched
    assert np.array_equal(q.degrid(weights, {"a": step}, seed=0)["a"], one["a"])
    assert not np.array_equal(q.degrid(weights, {"a": step}, seed=1)["a"], one["a"])
    assert _on_grid(one["a"], step) > 0.2


def test_gguf_steps_follow_the_qk_unpermutation(tmp_path):
    """Steps read from a GGUF file sit on the grid of the weights the loader returns, rows of
    attn_q / attn_k un-permuted; steps left in GGUF row order would not."""
    import gguf

    from edgellama.export.gguf_source import unpermute_rows

    heads, kv_heads = 4, 2
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    tensors = {"blk.0.attn_q.weight": ((64, 64), "Q4_1"), "blk.0.attn_k.weight": ((32, 64), "Q4_1"),
               "token_embd.weight": ((16, 64), "Q8_0")}
    deq = {}
    for i, (name, (shape, kind)) in enumerate(tensors.items()):
        raw, deq[name] = _quantized(shape, kind, seed=10 + i)
        writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    steps = q.gguf_steps(tmp_path / "m.gguf")
    assert sorted(steps) == ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                             "model.layers.0.self_attn.q_proj.weight"]
    q_hf = unpermute_rows(deq["blk.0.attn_q.weight"], heads)
    k_hf = unpermute_rows(deq["blk.0.attn_k.weight"], kv_heads)
    assert _on_grid(q_hf, steps["model.layers.0.self_attn.q_proj.weight"]) < 1e-3
    assert _on_grid(k_hf, steps["model.layers.0.self_attn.k_proj.weight"]) < 1e-3
    assert _on_grid(deq["token_embd.weight"], steps["model.embed_tokens.weight"]) < 1e-3
    raw_q = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "blk.0.attn_q.weight")
    gguf_order = q.block_steps(raw_q.data, "Q4_1")
    assert _on_grid(q_hf, gguf_order) > 0.1


# -- torch and ONNX Runtime sides ---------------------------------------------------------------------
def _bigram_onnx(path, table: np.ndarray, *, position_ids: bool, past_dtype) -> None:
    """A one-node graph with the decoder's inputs (past unused): logits = table[input_ids]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(past_dtype))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])]
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]))
    for i in range(2):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, ["b", 2, "p", "d"]))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "bigram", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", table.shape[1]])],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


@pytest.mark.parametrize("position_ids,past_dtype", [(True, np.float32), (False, np.float16)])
def test_ort_logits_fn_feeds_both_graph_signatures(tmp_path, position_ids, past_dtype):
    """Our export (position_ids, fp32 or fp16 past) and genai's builder (no position_ids) alike."""
    table = _rng(9).standard_normal((20, 20)).astype(np.float32)
    _bigram_onnx(tmp_path / "m.onnx", table, position_ids=position_ids, past_dtype=past_dtype)
    fn = q.ort_logits_fn(tmp_path / "m.onnx", num_kv_heads=2, head_dim=4, threads=1)
    wins = q.make_windows(_rng(10).integers(2, 20, size=40).tolist(), window=16, bos_id=1)
    ref = q.evaluate(_bigram_fn(table), wins, keep_logprobs=True)
    got = q.evaluate(fn, wins, reference=ref.logprobs)
    assert got.scores.kl_mean < 1e-10 and got.scores.top1 == 1.0
    assert q.onnx_size(tmp_path) == (tmp_path / "m.onnx").stat().st_size


@pytest.mark.slow
def test_onnx_export_of_tiny_agrees_with_torch(tmp_path_factory):
    from edgellama.export.sources import load_model

    from tests.conftest import shared_export

    model, tok, _ = load_model("tiny")
    folder = shared_export(tmp_path_factory, "tiny", target="portable")
    wins = q.make_windows(_rng(8).integers(3, 250, size=60).tolist(), window=24, bos_id=1)
    ref = q.evaluate(q.torch_logits_fn(model), wins, keep_logprobs=True)
    c = model.config
    got = q.evaluate(q.ort_logits_fn(folder / "model.onnx", num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim),
                     wins, reference=ref.logprobs)
    assert got.scores.kl_mean < 1e-6 and got.scores.top1 == 1.0
    assert got.scores.ppl == pytest.approx(ref.scores.ppl, rel=1e-4)
    assert q.onnx_size(folder) > 4 * sum(p.numel() for p in model.parameters()) * 0.9


@pytest.mark.slow
def test_smollm2_weights_sit_on_the_gguf_grid_and_degrid_moves_them(tmp_path):
    from edgellama.export.sources import smollm2_path

    from tests.conftest import smollm2_model

    path = smollm2_path()
    steps = q.gguf_steps(path)
    # The loaded weights by their HF names: the session's smollm2 (load_model = load_source's tensors
    # in a Llama; state_dict gives them back detached), not a second read of the GGUF.
    weights = smollm2_model()[0].state_dict()
    assert len(steps) == len([k for k in weights if k.endswith("proj.weight")]) + 1
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert _on_grid(weights[name].numpy(), steps[name]) < 1e-3, name
    noisy = q.degrid({k: weights[k] for k in steps}, steps, seed=0)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.all(np.abs((noisy[name] - weights[name]).numpy()) <= steps[name] / 2 + 1e-6)
    assert _on_grid(noisy[name].numpy(), steps[name]) > 0.2


# -- the benchmark script's goal lines --------------------------------------------------------------
def test_bench_goal_lines_judge_rows():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parents[2] / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(variant, ppl_change, kl, top1, ratio):
        return {"variant": variant, "ppl": 10 * (1 + ppl_change), "ppl_change": ppl_change, "kl_mean": kl,
                "top1": top1, "size": ratio and int(ratio * 1000), "size_ratio": ratio, "answer": "Paris", "paris": True,
                "seconds": 1.0}

    result = {"model": "m", "tokens": 10, "windows": 1, "window": 11, "text_sha256": "x",
              "rows": [row("fp32 torch (P)", 0.0, None, None, None), row("int8", 0.001, 1e-3, 0.98, 0.28),
                       row("int4", 0.2, 0.2, 0.7, 0.19), row("genai builder int4", 0.3, 0.4, 0.6, 0.16),
                       {"variant": "int8-dynamic", "error": "boom"}]}
    lines = bench.goal_lines(result)
    assert any("int8:" in line and ": met" in line for line in lines)
    assert any("genai int4's / 3" in line and "MISSED" in line for line in lines)  # KL 0.2 > 0.4 / 3
    assert not any("int8-dynamic" in line for line in lines)  # an error row is not judged
    assert "| int8-dynamic | error: boom |" in bench.markdown(result)
