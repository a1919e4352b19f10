"""Parity metrics, tolerances and reports on synthetic arrays (no model, no ONNX Runtime)."""

import json
import math

import numpy as np
import pytest

from edgellama.errors import EdgellamaError
from edgellama.check import metrics, parity_report, parity_tolerances
from edgellama.check.parity import checks_for, make_batches
from edgellama.check.parity_sides import find_probe_values
from edgellama.folder import Manifest


def test_tensor_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 3, 50)).astype(np.float32)
    got = ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)
    m = metrics.tensor_metrics(ref, got)
    err = np.abs(ref.astype(np.float64) - got)
    assert m["max_abs"] == pytest.approx(err.max())
    assert m["max_rel"] == pytest.approx(err.max() / np.abs(ref).max())
    assert m["p999_abs"] == pytest.approx(np.percentile(err, 99.9))
    assert m["p999_abs"] <= m["max_abs"]
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cos = (a @ b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert m["cosine"] == pytest.approx(cos, abs=1e-12)
    assert metrics.tensor_metrics(ref, ref) == {"max_abs": 0.0, "max_rel": 0.0, "p999_abs": 0.0, "cosine": 1.0}


def test_padding_rows_are_ignored():
    ref = np.zeros((2, 4, 8), np.float32)
    got = ref.copy()
    got[1, 0] = 1e6        # a padding slot: garbage both sides may disagree on
    valid = np.ones((2, 4), bool)
    valid[1, 0] = False
    assert metrics.tensor_metrics(ref, got, valid)["max_abs"] == 0.0
    assert metrics.tensor_metrics(ref, got)["max_abs"] == 1e6


def test_nan_never_passes():
    ref = np.ones((1, 2, 4), np.float32)
    got = ref.copy()
    got[0, 1, 2] = np.nan
    m = metrics.logit_metrics(ref, got)
    assert m["max_abs"] == math.inf and m["kl_mean"] == math.inf and m["top1"] == 0.0
    assert not parity_tolerances.within("max_rel", m["max_rel"], 1.0)


def test_kl_and_topk_against_direct_formulas():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(3, 5, 40))
    got = ref + rng.normal(scale=0.3, size=ref.shape)
    m = metrics.logit_metrics(ref, got)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(got) / np.exp(got).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)
    assert m["kl_mean"] == pytest.approx(kl.mean()) and m["kl_max"] == pytest.approx(kl.max())
    assert m["top1"] == pytest.approx((ref.argmax(-1) == got.argmax(-1)).mean())
    t5r, t5g = np.argsort(-ref, -1)[..., :5], np.argsort(-got, -1)[..., :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5r.reshape(-1, 5), t5g.reshape(-1, 5))])
    assert m["top5"] == pytest.approx(overlap)
    assert 0 < m["top1"] < 1 and m["kl_mean"] > 0


def test_identical_logits_agree_fully():
    x = np.random.default_rng(2).normal(size=(1, 4, 30))
    m = metrics.logit_metrics(x, x.copy())
    assert m["kl_max"] == 0.0 and m["top1"] == m["top5"] == m["top1_in_top5"] == 1.0


def test_shifted_logits_have_zero_kl_but_abs_error():
    # softmax is shift invariant: the distribution metrics see no change, the tensor metrics do.
    x = np.random.default_rng(3).normal(size=(1, 3, 20))
    m = metrics.logit_metrics(x, x + 2.0)
    assert m["kl_max"] < 1e-12 and m["top1"] == 1.0 and m["max_abs"] == pytest.approx(2.0)


def test_merge_takes_worst_and_weighted_means():
    a = {"max_abs": 1.0, "cosine": 0.9, "top1": 1.0, "kl_mean": 0.0, "kl_max": 0.1}
    b = {"max_abs": 3.0, "cosine": 0.99, "top1": 0.0, "kl_mean": 1.0, "kl_max": 0.05}
    m = metrics.merge([a, b], [3, 1])
    assert m == {"max_abs": 3.0, "cosine": 0.9, "top1": 0.75, "kl_mean": 0.25, "kl_max": 0.1}


@pytest.mark.parametrize("ref, got, want", [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1),
                                            ([4, 2], [5, 2], 0), ([1, 2], [1, 2, 3], 2)])
def test_first_divergence(ref, got, want):
    assert metrics.first_divergence(ref, got) == want


def test_left_padded_batch():
    batches = make_batches([[5, 6, 7], [8]], pad_id=0)
    assert [b.label for b in batches] == ["prompt 0", "prompt 1", "left-padded batch"]
    padded = batches[-1]
    assert padded.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# -- tolerances -------------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest, want", [
    ({"dtype": "fp32", "quantization": []}, "fp32"),
    ({"dtype": "fp16", "quantization": []}, "fp16"),
    ({"dtype": "fp32", "quantization": [{"mode": "fp16"}]}, "fp16"),
    ({"dtype": "fp32", "quantization": [{"mode": "int8-dynamic"}]}, "int8-dynamic"),
    ({"dtype": "fp32", "quantization": [{"pass": "int8"}]}, "int8"),
    ({"dtype": "fp16", "quantization": [{"mode": "int4", "block_size": 32}]}, "int4"),
])
def test_precision_from_manifest(manifest, want):
    assert Manifest(config={}, **manifest).precision == want


def test_tolerances_loosen_with_precision():
    # Each lower precision must accept at least what the higher one accepts.
    for hi, lo in zip(parity_tolerances.PRECISIONS, parity_tolerances.PRECISIONS[1:]):
        for key, direction in parity_tolerances.DIRECTION.items():
            a, b = parity_tolerances.TOLERANCES[hi][key], parity_tolerances.TOLERANCES[lo][key]
            if a is None or b is None:
                continue
            assert (b >= a) if direction == "max" else (b <= a), (hi, lo, key)
    assert set(parity_tolerances.REASONS) == set(parity_tolerances.PRECISIONS)
    assert parity_tolerances.looser("fp16", "int8") == "int8" and parity_tolerances.looser("fp32", "fp16") == "fp16"


def test_overrides():
    o = parity_tolerances.parse_overrides(["kl_mean=1e-3", "greedy_match=none"])
    tol = parity_tolerances.resolve("fp32", o)
    assert tol["kl_mean"] == 1e-3 and tol["greedy_match"] is None
    assert tol["top1"] == parity_tolerances.TOLERANCES["fp32"]["top1"]
    for bad in (["nonsense=1"], ["kl_mean"], ["kl_mean=abc"], ["top1=nan"]):
        with pytest.raises(EdgellamaError):
            parity_tolerances.parse_overrides(bad)


def test_checks_and_reports_render():
    logits = {k: 0.0 for k in metrics.LOGIT_KEYS}
    logits.update(cosine=1.0, top1=0.5, top5=1.0, top1_in_top5=1.0, kl_mean=0.3, max_rel=float("inf"))
    tol = parity_tolerances.resolve("fp32")
    checks = checks_for(logits, {"max_rel": 0.0, "cosine": 1.0}, 1.0, tol)
    failed = {c["tolerance_key"] for c in checks if not c["pass"]}
    assert failed == {"top1", "kl_mean", "max_rel"}
    comparison = {"provider": "cpu", "candidate": "m (cpu)", "status": "fail", "checks": checks,
                  "logits": {"prefill": logits, "decode": logits, "all": logits},
                  "present_kv": {"max_abs": 0.0, "max_rel": 0.0, "p999_abs": 0.0, "cosine": 1.0},
                  "greedy": {"match_fraction": 0.5, "tokens_per_row": 4, "first_divergence": 2, "rows": []},
                  "localization": {"batch": "prompt 0", "block_rel": 1e-4, "note": None, "blocks": [],
                                   "first_failing": {"layer": 1, "block": "o_proj", "op": "MatMul", "key": "x",
                                                     "candidate_name": "model.layers.1.self_attn.o_proj/MatMul",
                                                     "max_rel": 0.5, "cosine": 0.9}}}
    report = {"status": "fail", "model": "m", "reference": "torch", "precision": "fp32", "decode_steps": 3,
              "prompts": ["a"], "seconds": 0.1, "tolerances": tol,
              "tolerance_reason": parity_tolerances.REASONS["fp32"], "comparisons": [comparison]}
    text = parity_report.to_text(report)
    assert "layer 1 o_proj (MatMul)" in text and "FAIL logits top1" in text and "step 2 of 4" in text
    md = parity_report.to_markdown(report)
    assert "❌" in md and "| logits decode |" in md and "model.layers.1.self_attn.o_proj/MatMul" in md
    rows = json.loads(parity_report.to_json(report))["comparisons"][0]["checks"]
    assert next(c for c in rows if c["tolerance_key"] == "max_rel")["value"] == "inf"


def test_probe_values_found_by_module_path_and_op_kind():
    from onnx import helper

    def node(op, name, ins, outs):
        return helper.make_node(op, ins, outs, name=name)

    nodes = [
        node("SkipSimplifiedLayerNormalization", "model.layers.0.input_layernorm/SkipSimplifiedLayerNormalization",
             ["x", "r"], ["ln0", "", "", "res"]),
        node("MatMul", "model.layers.0.self_attn.q_proj/MatMul", ["ln0", "wq"], ["q"]),
        # k's rotation comes first in graph order: found by the attention input it feeds, not by order.
        node("RotaryEmbedding", "model.layers.0.self_attn/RotaryEmbedding_1", ["k", "p"], ["kr"]),
        node("RotaryEmbedding", "model.layers.0.self_attn/RotaryEmbedding", ["q", "p"], ["qr"]),
        node("GroupQueryAttention", "model.layers.0.self_attn/GroupQueryAttention", ["qr", "kr", "v"], ["att"]),
        node("MatMulNBits", "model.layers.0.self_attn.o_proj/MatMulNBits", ["att", "wo"], ["o"]),
        node("RMSNorm", "model.layers.0.post_attention_layernorm/RMSNorm", ["o"], ["ln1"]),
        node("MatMul", "model.layers.0.mlp.down_proj/MatMul", ["h", "wd"], ["mlp"]),
        node("RMSNorm", "model.norm/RMSNorm", ["mlp"], ["fin"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    found = {k: v for k, (v, _) in find_probe_values(graph, 1).items()}
    assert found == {"layers.0.input_layernorm": "ln0", "layers.0.q_rotary": "qr", "layers.0.k_rotary": "kr",
                     "layers.0.attention": "att", "layers.0.o_proj": "o",
                     "layers.0.post_attention_layernorm": "ln1", "layers.0.mlp": "mlp", "norm": "fin"}
