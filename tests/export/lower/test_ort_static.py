"""`ort_static.py`: the ort-lowered graph -> the static KV cache contract (shared buffers, packed
QKV, rotary inside GroupQueryAttention, last-position logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellama.errors import ExportError
from edgellama.export import model as M
from edgellama.export.lower import lower, lower_ort, lower_with_report
from edgellama.export.lower.engine import Context
from edgellama.export.lower.ort_static import LOGITS_TO_KEEP, SEQLENS_K, StaticKvCache
from edgellama.export.lower.targets import default_kv_cache
from tests.conftest import left_padded_batch, ort_session
from tests.export.lower.conftest import LAYERS, TOL, ops

MS = "com.microsoft"


def static_feeds(cfg, ids: np.ndarray, lengths, buffers):
    """input_ids right-padded rows, the mask by row lengths, the shared buffers."""
    mask = np.zeros((ids.shape[0], int(max(lengths))), np.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = buffers[2 * i], buffers[2 * i + 1]
    return feeds


def test_op_counts_before_and_after(portable_fp32):
    dynamic = lower_ort(portable_fp32[1]())
    before = ops(dynamic)
    assert before[(MS, "RotaryEmbedding")] == 2 * LAYERS and before[(MS, "GroupQueryAttention")] == LAYERS
    static, report = lower_with_report(portable_fp32[1](), target="ort", kv_cache="static")
    after = ops(static)
    assert after[(MS, "RotaryEmbedding")] == 0 and after[(MS, "GroupQueryAttention")] == LAYERS
    assert after[("", "Where")] == 0                                # no attention bias: lengths say it
    # q, k, v MatMuls -> one packed MatMul per layer
    assert after[("", "MatMul")] == before[("", "MatMul")] - 2 * LAYERS
    assert after[("", "ReduceSum")] == 1                            # seqlens_k once for every layer
    assert report.lowered[-1].rewrite == "static_kv_cache"
    gqa = next(n for n in static.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["do_rotary"].as_int() == 1 and gqa.inputs[1] is None and gqa.inputs[5].name == SEQLENS_K
    names = [v.name for v in static.graph.inputs]
    assert "position_ids" not in names and names[:2] == ["input_ids", "attention_mask"]
    past = next(v for v in static.graph.inputs if v.name == "past_key_values.0.key")
    present = next(v for v in static.graph.outputs if v.name == "present.0.key")
    assert str(past.shape[2]) == str(present.shape[2]) == "max_sequence"
    logits = next(v for v in static.graph.outputs if v.name == "logits")
    assert logits.shape[1] == 1                      # what genai allocates; K > 1 on request
    keep = static.graph.initializers[LOGITS_TO_KEEP]
    assert keep in static.graph.inputs and keep.const_value.numpy().tolist() == [1]
    assert not any(name.endswith(("q_proj.weight", "k_proj.weight")) for name in static.graph.initializers)


def test_right_padded_batch_in_place_matches_torch(portable_fp32, tmp_path):
    """A right-padded prompt batch, then decode steps at each row's own length, in one buffer per
    layer and kind that the session writes in place: logits equal torch's per row."""
    model, fresh = portable_fp32
    cfg = model.config
    sess = ort_session(lower(fresh(), target="ort", kv_cache="static"), tmp_path)
    ids_left, mask_left = left_padded_batch(cfg.vocab_size, lengths=(9, 5, 7))
    lengths = [int(n) for n in mask_left.sum(1)]
    rows = [ids_left[b, mask_left[b].bool()].tolist() for b in range(3)]
    import onnxruntime as ort

    buffers = [np.zeros((3, cfg.num_key_value_heads, 32, cfg.head_dim), np.float32) for _ in range(2 * LAYERS)]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    binding = sess.io_binding()
    for i in range(LAYERS):
        for k, kind in enumerate(("key", "value")):
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", values[2 * i + k])
            binding.bind_ortvalue_output(f"present.{i}.{kind}", values[2 * i + k])
    ids = np.zeros((3, max(lengths)), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    t_past = model.empty_cache(3)
    cur, m = ids_left, mask_left
    worst = 0.0
    for step in range(4):
        feeds = static_feeds(cfg, ids, lengths, buffers)
        binding.bind_cpu_input("input_ids", feeds["input_ids"])
        binding.bind_cpu_input("attention_mask", feeds["attention_mask"])
        binding.bind_output("logits", "cpu")
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()    # bound last
        with torch.no_grad():
            tl, t_past = model(cur, m, M.positions_from_mask(m, cur.shape[1]), t_past)
        assert logits.shape == (3, 1, cfg.vocab_size)
        worst = max(worst, float(np.abs(logits[:, 0] - tl[:, -1].numpy()).max()))
        nxt = tl[:, -1].argmax(-1)
        cur, m = nxt[:, None], torch.cat((m, torch.ones(3, 1, dtype=torch.int64)), 1)
        ids, lengths = nxt[:, None].numpy(), [n + 1 for n in lengths]
    assert worst <= TOL
    # the buffers themselves hold the cache; row 1 (5 tokens + 3 steps, its prompt padded to 9 in
    # the prefill) wrote nothing past slot 8
    assert np.abs(buffers[0][1, :, :8]).min(axis=-1).max() > 0 and np.abs(buffers[0][1, :, 9:]).sum() == 0


def test_logits_to_keep_returns_the_last_k_real_positions_per_row(portable_fp32, tmp_path):
    """A right-padded prompt batch fed `logits_to_keep` = K returns each row's last K real
    positions (a row shorter than K repeats its first), equal to torch's; not fed, one position;
    the LM head never sees the padding."""
    model, fresh = portable_fp32
    cfg = model.config
    sess = ort_session(lower(fresh(), target="ort", kv_cache="static"), tmp_path)
    assert LOGITS_TO_KEEP not in [i.name for i in sess.get_inputs()]
    assert [i.name for i in sess.get_overridable_initializers()] == [LOGITS_TO_KEEP]
    ids_left, mask_left = left_padded_batch(cfg.vocab_size, lengths=(9, 2, 6))
    lengths = [int(n) for n in mask_left.sum(1)]
    ids = np.zeros((3, max(lengths)), np.int64)
    for b in range(3):
        ids[b, :lengths[b]] = ids_left[b, mask_left[b].bool()].numpy()
    with torch.no_grad():
        want, _ = model(ids_left, mask_left, M.positions_from_mask(mask_left, ids_left.shape[1]), model.empty_cache(3))
    width = ids_left.shape[1]

    def buffers():
        return [np.zeros((3, cfg.num_key_value_heads, 16, cfg.head_dim), np.float32) for _ in range(2 * LAYERS)]

    feeds = static_feeds(cfg, ids, lengths, buffers())
    assert sess.run(["logits"], feeds)[0].shape == (3, 1, cfg.vocab_size)
    for k in (1, 3):
        got = sess.run(["logits"], {**static_feeds(cfg, ids, lengths, buffers()),
                                    LOGITS_TO_KEEP: np.array([k], np.int64)})[0]
        assert got.shape == (3, k, cfg.vocab_size)
        for b, n in enumerate(lengths):
            # left-padded torch row b: its real positions are the last n slots
            slots = [width - n + max(p, 0) for p in range(n - k, n)]
            np.testing.assert_allclose(got[b], want[b, slots].numpy(), atol=TOL, rtol=0)


def test_full_logits_option(portable_fp32):
    static = portable_fp32[1]()
    lower_ort(static)
    StaticKvCache().rewrite(static, Context(static.graph, "cpu"), last_logits=False)
    logits = next(v for v in static.graph.outputs if v.name == "logits")
    assert str(logits.shape[1]) == "sequence"


def test_refusals(portable_fp32):
    # portable / onnx23 keep the dynamic contract
    with pytest.raises(ExportError, match="needs --target ort"):
        lower(portable_fp32[1](), target="portable", kv_cache="static")
    with pytest.raises(ExportError, match="unknown KV cache"):
        lower(portable_fp32[1](), target="ort", kv_cache="shared")
    # fp32 on CUDA: ORT has no fp32 GroupQueryAttention kernel there
    with pytest.raises(ExportError, match="no float GroupQueryAttention kernel for cuda"):
        lower(portable_fp32[1](), target="ort", provider="cuda", kv_cache="static")
    # a graph that is not ort-lowered: check says why, nothing is edited
    m = portable_fp32[1]()
    before = ops(m)
    assert "no com.microsoft.GroupQueryAttention" in StaticKvCache().check(m, Context(m.graph, "cpu"))
    assert ops(m) == before
    # a projection that is not a plain MatMul (quantized before lowering)
    m = lower_ort(portable_fp32[1]())
    gqa = next(n for n in m.graph if n.op_type == "GroupQueryAttention")
    gqa.inputs[2].producer().op_type = "MatMulNBits"
    assert "plain MatMul" in StaticKvCache().check(m, Context(m.graph, "cpu"))


def test_default_contract_per_target():
    assert default_kv_cache("ort", dtype="fp32", provider="cpu") == "static"
    assert default_kv_cache("ort", dtype="fp16", provider="cuda") == "static"
    assert default_kv_cache("ort", dtype="fp32", provider="cuda") == "dynamic"
    assert default_kv_cache("onnx23", dtype="fp32", provider="cpu") == "dynamic"
    assert default_kv_cache("portable", dtype="fp32", provider="cpu") == "dynamic"
