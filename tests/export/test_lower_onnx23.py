"""The `onnx23` lowering pass: op counts, refusals, the checker, and parity on ONNX Runtime CPU.

Parity: prefill + 8 decode steps through the KV cache on a left-padded batch of two, logits max
abs diff <= 1e-4 in fp32 against the torch blocks (`export/model.py`); the padded row equals that
row run alone.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from edgellama.errors import ExportError
from edgellama.export import config as C
from edgellama import folder as F
from edgellama.export import model as M
from edgellama.export import onnx_export as E
from edgellama.export.lower_onnx23 import check_rotary, lower_onnx23, lower_onnx23_with_report

TOL = 1e-4
LAYERS = 3
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def random_llama(layers: int = LAYERS, seed: int = 0) -> M.Llama:
    """Tiny Llama with weights large enough that logits are far from uniform and norms are not 1."""
    torch.manual_seed(seed)
    model = M.Llama(C.tiny(num_hidden_layers=layers)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def ops(ir_model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in ir_model.graph)


def io_signature(ir_model):
    return [(v.name, v.dtype, [str(d) for d in v.shape])
            for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch reference on a tiny model runs faster on one thread (two spin against each other)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def portable_fp32():
    model = random_llama()
    proto = ir.serde.serialize_model(E.export_onnx(model, opset=23))
    # Lowering edits in place: every test gets its own copy of the exported model.
    return model, lambda: ir.serde.deserialize_model(proto)


# -- structure ------------------------------------------------------------------------------------
def test_op_counts_and_graph_contract(portable_fp32):
    _, fresh = portable_fp32
    before = fresh()
    counts = ops(before)
    assert counts[("edgellama", "RMSNorm")] == 2 * LAYERS + 1
    assert counts[("edgellama", "RotaryEmbedding")] == 2 * LAYERS
    assert counts[("edgellama", "GroupQueryAttention")] == LAYERS
    assert len(before.functions) == 3
    signature = io_signature(before)

    after, refusals = lower_onnx23_with_report(fresh())
    assert refusals == []
    counts = ops(after)
    assert counts[("", "Attention")] == LAYERS
    assert counts[("", "RMSNormalization")] == 2 * LAYERS + 1
    assert counts[("", "RotaryEmbedding")] == 2 * LAYERS
    assert not [k for k in counts if k[0] != ""]            # standard ai.onnx only
    assert counts[("", "Where")] == 1                        # one attention mask, shared by all layers
    assert len(after.functions) == 0
    assert dict(after.opset_imports) == {"": 23}
    assert io_signature(after) == signature
    # Node names survive, so block-level parity probes still find them.
    names = {n.name: n for n in after.graph}
    attn = names["model.layers.2.self_attn/GroupQueryAttention"]
    assert attn.op_type == "Attention"
    assert {k: a.value for k, a in attn.attributes.items()} == {
        "q_num_heads": 4, "kv_num_heads": 2, "scale": 0.25, "is_causal": 0, "softmax_precision": 1}
    rope = names["model.layers.0.self_attn/RotaryEmbedding"]
    # Opset 23 order: X, cos_cache, sin_cache, position_ids.
    assert [v.name for v in rope.inputs[1:]] == ["model.rope_cos", "model.rope_sin", "position_ids"]
    assert names["model.norm/RMSNorm"].attributes["stash_type"].value == 1


def test_full_check_passes(portable_fp32):
    proto = ir.serde.serialize_model(lower_onnx23(portable_fp32[1]()))
    onnx.checker.check_model(proto, full_check=True)


def test_through_export_lower(portable_fp32):
    """`onnx_export.lower(target="onnx23")` reaches this pass."""
    lowered = E.lower(portable_fp32[1](), target="onnx23")
    assert ops(lowered)[("", "Attention")] == LAYERS


def test_refuses_a_model_not_at_opset_23():
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    with pytest.raises(ExportError, match="opset 23 .*opset 18"):
        lower_onnx23(model)


def test_rotary_check_refuses_heads_that_do_not_divide(portable_fp32):
    m = portable_fp32[1]()
    rope = next(n for n in m.graph if n.op_type == "RotaryEmbedding")
    assert check_rotary(rope, None) is None
    rope.attributes["num_heads"] = ir.AttrInt64("num_heads", 3)
    assert "num_heads 3 does not divide X's last dim 64" in check_rotary(rope, None)


# -- refused nodes stay function ops and still run ----------------------------------------------------
def _refused_model(fresh):
    """The final norm's scale reshaped to [1, 1, H] (same numbers, a shape RMSNormalization's check
    refuses) and layer 1's query rotary fed a cos cache of unknown shape."""
    m = fresh()
    norm = next(n for n in m.graph if n.name == "model.norm/RMSNorm")
    hidden = norm.inputs[0].shape[-1]
    shape = ir.node("Constant", [], {"value": ir.tensor(np.array([1, 1, hidden], np.int64))}, name="scale_shape")
    scale3 = ir.node("Reshape", [norm.inputs[1], shape.outputs[0]], name="scale_3d")
    scale3.outputs[0].dtype, scale3.outputs[0].shape = norm.inputs[1].dtype, ir.Shape([1, 1, hidden])
    m.graph.insert_before(norm, [shape, scale3])
    norm.replace_input_with(1, scale3.outputs[0])

    rope = next(n for n in m.graph if n.name == "model.layers.1.self_attn/RotaryEmbedding")
    cos = ir.node("Identity", [rope.inputs[2]], name="cos_unknown_shape")
    cos.outputs[0].dtype = rope.inputs[2].dtype        # dtype known, shape not
    m.graph.insert_before(rope, cos)
    rope.replace_input_with(2, cos.outputs[0])
    return m


def test_refused_nodes_keep_their_functions(portable_fp32, tmp_path):
    model, fresh = portable_fp32
    lowered, refusals = lower_onnx23_with_report(_refused_model(fresh))
    reasons = {r.node: (r.rewrite, r.reason) for r in refusals}
    assert set(reasons) == {"model.norm/RMSNorm", "model.layers.1.self_attn/RotaryEmbedding"}
    assert reasons["model.norm/RMSNorm"][0] == "rms_normalization"
    assert "not a 1-D [hidden] tensor" in reasons["model.norm/RMSNorm"][1]
    assert "caches are not [positions, head_dim/2]" in reasons["model.layers.1.self_attn/RotaryEmbedding"][1]
    counts = ops(lowered)
    assert counts[("edgellama", "RMSNorm")] == 1 and counts[("", "RMSNormalization")] == 2 * LAYERS
    assert counts[("edgellama", "RotaryEmbedding")] == 1 and counts[("", "RotaryEmbedding")] == 2 * LAYERS - 1
    assert counts[("", "Attention")] == LAYERS
    assert sorted(key[1] for key in lowered.functions) == ["RMSNorm", "RotaryEmbedding"]
    assert lowered.opset_imports["edgellama"] == 1
    onnx.checker.check_model(ir.serde.serialize_model(lowered), full_check=True)
    # It still runs, with the reference's numbers.
    loop = Loop(session(lowered, tmp_path), model.config, "fp32")
    ids, mask = left_padded_batch(model.config.vocab_size)
    assert teacher_forced(model, loop, ids, mask, steps=2) <= TOL


# -- parity on ONNX Runtime ---------------------------------------------------------------------------
def session(ir_model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    F.save_model(ir_model, folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(folder / F.MODEL), opts, providers=["CPUExecutionProvider"])


class Loop:
    """Prefill + decode with a bare onnxruntime session (the export checked without the runtime layer)."""

    def __init__(self, sess, cfg: C.LlamaConfig, dtype: str):
        self.sess, self.cfg, self.dtype = sess, cfg, NP_DTYPES[dtype]
        self.outputs = [o.name for o in sess.get_outputs()]

    def step(self, ids, mask, past):
        feed = {"input_ids": ids, "attention_mask": mask,
                "position_ids": M.positions_from_mask(torch.from_numpy(mask), ids.shape[1]).numpy()}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = self.sess.run(self.outputs, feed)
        return out[0], list(zip(out[1::2], out[2::2]))

    def empty(self, batch):
        shape = (batch, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        return [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))] * self.cfg.num_hidden_layers


def left_padded_batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = ids[1, :4] = 0
    return ids, mask


def teacher_forced(model, loop, ids, mask, steps):
    """Both sides consume torch's greedy tokens; the worst logits diff over real (unpadded) positions."""
    worst = 0.0
    t_past, o_past = model.empty_cache(ids.shape[0]), loop.empty(ids.shape[0])
    cur, m = ids, mask
    with torch.no_grad():
        for _ in range(steps + 1):
            tl, t_past = model(cur, m, M.positions_from_mask(m, cur.shape[1]), t_past)
            ol, o_past = loop.step(cur.numpy(), m.numpy(), o_past)
            assert all(np.isfinite(k).all() and np.isfinite(v).all() for k, v in o_past)
            valid = m[:, -cur.shape[1]:].bool().numpy()
            worst = max(worst, float(np.abs(ol - tl.float().numpy())[valid].max()))
            cur = tl[:, -1].argmax(-1, keepdim=True)
            m = torch.cat((m, torch.ones_like(cur)), dim=1)
    return worst


@pytest.fixture(scope="module")
def fp32_loop(portable_fp32, tmp_path_factory):
    model, fresh = portable_fp32
    return model, Loop(session(lower_onnx23(fresh()), tmp_path_factory.mktemp("onnx23")), model.config, "fp32")


def test_fp32_parity_prefill_and_decode(fp32_loop):
    model, loop = fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(model, loop, ids, mask, steps=8)
    print(f"onnx23 fp32: prefill+8 decode logits max abs diff {diff:.2e}")
    assert diff <= TOL


def test_left_padded_row_equals_row_alone(fp32_loop):
    model, loop = fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    alone, _ = loop.step(ids[1:, 4:].numpy(), mask[1:, 4:].numpy(), loop.empty(1))
    padded, _ = loop.step(ids.numpy(), mask.numpy(), loop.empty(2))
    diff = float(np.abs(alone[0] - padded[1, 4:]).max())
    print(f"onnx23 fp32: padded row vs alone max abs diff {diff:.2e}")
    assert diff <= TOL


def test_chunked_continuation_batch_two(fp32_loop):
    """Several new tokens on top of a cache, left-padded batch of two: Attention takes it (ORT's
    com.microsoft GroupQueryAttention does not), and the numbers match torch."""
    model, loop = fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    t_past, o_past, worst = model.empty_cache(2), loop.empty(2), 0.0
    for lo, hi in [(0, 5), (5, 8), (8, 9)]:
        m = mask[:, :hi]
        with torch.no_grad():
            tl, t_past = model(ids[:, lo:hi], m, M.positions_from_mask(m, hi - lo), t_past)
        ol, o_past = loop.step(ids[:, lo:hi].numpy(), m.numpy(), o_past)
        valid = m[:, lo:hi].bool().numpy()
        worst = max(worst, float(np.abs(ol - tl.numpy())[valid].max()))
    print(f"onnx23 fp32: chunked continuation (batch 2) max abs diff {worst:.2e}")
    assert worst <= TOL


def test_fp16_runs_on_cpu(tmp_path):
    """fp16 lowered: ORT CPU has fp16 kernels for all three ops; the fp16 attention mask (finite
    minimum -65504) keeps the caches finite; error stays that of the portable fp16 graph."""
    model = random_llama()
    proto = ir.serde.serialize_model(E.export_onnx(model, dtype="fp16", opset=23))
    lowered, refusals = lower_onnx23_with_report(ir.serde.deserialize_model(proto))
    assert refusals == [] and ops(lowered)[("", "Attention")] == LAYERS
    loop = Loop(session(lowered, tmp_path / "onnx23"), model.config, "fp16")
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(random_llama(), loop, ids, mask, steps=8)   # against fp32 torch
    portable = Loop(session(ir.serde.deserialize_model(proto), tmp_path / "portable"), model.config, "fp16")
    base = teacher_forced(random_llama(), portable, ids, mask, steps=8)
    print(f"onnx23 fp16 vs torch fp32: {diff:.2e} (portable fp16: {base:.2e})")
    assert np.isfinite(diff) and diff <= max(3 * base, 1e-2)
