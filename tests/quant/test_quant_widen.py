"""Quantizing an fp16 folder (quant/widen.py), calibration by segments (smooth.py) and weights
processed a chunk of columns at a time (common.py, blockwise.py): each must give what the whole,
fp32 computation gives."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgellama import folder
from edgellama.errors import QuantError
from edgellama.quant import common, smooth, widen
from edgellama.quant.api import apply_request, check_request, quantize_folder
from tests.conftest import shared_export

# (target, KV cache contract): the static contract is ort's default for fp32 and fp16 on CPU.
GRAPHS = [("ort", "static"), ("ort", "dynamic"), ("portable", "dynamic")]
# the fp16 exports these tests add to the session's: ort static (new) and portable (shared with parity's)
FP16_GRAPHS = [("ort", "static"), ("portable", "dynamic")]


def _pair(tmp_path_factory, target: str, kv_cache: str) -> tuple[Path, Path]:
    return (shared_export(tmp_path_factory, "tiny", target=target, kv_cache=kv_cache),
            shared_export(tmp_path_factory, "tiny", target=target, kv_cache=kv_cache, dtype="fp16"))


def _structure(model: ir.Model) -> onnx.ModelProto:
    """The model without weight bytes or metadata (torch's trace records its own node names there),
    the values onnx_ir named itself (`val_N`, numbered as rules happened to create them: an fp16
    graph's Skip norms, split again by widen, used up other numbers) renamed in graph order."""
    generated = [v for n in model.graph for v in n.outputs if v.name and re.fullmatch(r"val_\d+", v.name)]
    for v in generated:
        v.name = None
    for i, v in enumerate(generated):
        v.name = f"generated_{i}"
    proto = ir.to_proto(model)
    for t in proto.graph.initializer:
        for field in ("raw_data", "external_data", "data_location", "float_data", "int32_data", "int64_data"):
            t.ClearField(field)
    for group in (proto.graph.input, proto.graph.output, proto.graph.value_info):
        for v in group:
            v.ClearField("metadata_props")
    proto.graph.ClearField("metadata_props")
    proto.ClearField("metadata_props")
    return proto


def _rounded(model: ir.Model) -> None:
    """Every float32 initializer rounded to float16 and back, in place."""
    for v in model.graph.initializers.values():
        x = common.read(v.const_value)
        if x.dtype == np.float32:
            common.set_array(v, x.astype(np.float16).astype(np.float32))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("target,kv_cache", FP16_GRAPHS)
def test_widened_fp16_export_is_the_fp32_export_of_its_rounded_weights(tmp_path_factory, target, kv_cache):
    fp32, fp16 = _pair(tmp_path_factory, target, kv_cache)
    want, got = folder.load_model_ir(fp32), folder.load_model_ir(fp16)
    assert widen.is_fp16(got) and not widen.is_fp16(want)
    record = widen.apply(got)
    assert record["identity_casts_removed"] == 1          # the logits Cast
    a, b = _structure(want), _structure(got)
    assert list(a.graph.node) == list(b.graph.node)
    assert list(a.graph.input) == list(b.graph.input) and list(a.graph.output) == list(b.graph.output)
    assert list(a.graph.value_info) == list(b.graph.value_info)
    assert list(a.functions) == list(b.functions)
    assert list(a.graph.initializer) == list(b.graph.initializer)      # names, dtypes, shapes
    for name, v in want.graph.initializers.items():
        x, y = common.read(v.const_value), common.read(got.graph.initializers[name].const_value)
        ref = x.astype(np.float16).astype(np.float32) if x.dtype == np.float32 else x
        assert y.dtype == ref.dtype and np.array_equal(y, ref), name


@pytest.mark.parametrize("target,kv_cache,mode", [("ort", "static", "int4"), ("portable", "dynamic", "int8"),
                                                  ("ort", "static", "int8-dynamic")])
def test_quantizing_an_fp16_folder_gives_the_bytes_of_the_rounded_fp32_export(tmp_path_factory, tmp_path, target,
                                                                              kv_cache, mode):
    fp32, fp16 = _pair(tmp_path_factory, target, kv_cache)
    out = quantize_folder(fp16, tmp_path / "q", mode=mode)
    ref = folder.load_model_ir(fp32)
    _rounded(ref)
    apply_request(ref, check_request(mode), target=target)
    (tmp_path / "ref").mkdir()
    folder.save_model(ref, tmp_path / "ref")
    assert _sha(out / folder.DATA) == _sha(tmp_path / "ref" / folder.DATA)
    manifest = folder.verify_folder(out)
    assert manifest.quantized_from["dtype"] == "fp16" and manifest.dtype == "fp32"
    assert manifest.quantization[0]["widened"]["from"] == "fp16"
    assert manifest.kv_dtype == "float"


def test_a_folder_quantized_from_fp16_generates(tmp_path_factory, tmp_path):
    from edgellama.runtime.generator import Generator

    _, fp16 = _pair(tmp_path_factory, "ort", "static")
    out = quantize_folder(fp16, tmp_path / "int4", mode="int4")
    result = Generator(out, provider="cpu").generate_ids([5, 9, 11, 3], max_new_tokens=4, eos=False)[0]
    vocab = folder.read_manifest(out).config["vocab_size"]
    assert len(result.token_ids) == 4 and all(0 <= t < vocab for t in result.token_ids)


def test_fp16_to_fp16_is_refused_in_one_line(tmp_path_factory, tmp_path):
    _, fp16 = _pair(tmp_path_factory, "portable", "dynamic")
    with pytest.raises(QuantError, match="already an fp16 export") as e:
        quantize_folder(fp16, tmp_path / "q", mode="fp16")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()


# -- calibration by segments ------------------------------------------------------------------------
def _whole_model_statistics(src: Path, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The reference: one ONNX Runtime session over the whole model with the values as extra outputs."""
    import onnxruntime as ort

    model = onnx.load(str(src / folder.MODEL))
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
    return [np.abs(x.reshape(-1, x.shape[-1])).max(0).astype(np.float64) for x in outs]


@pytest.mark.parametrize("target,kv_cache", GRAPHS)
def test_segments_give_the_whole_model_statistics(tmp_path_factory, monkeypatch, target, kv_cache):
    fp32, _ = _pair(tmp_path_factory, target, kv_cache)
    model = folder.load_model_ir(fp32)
    values = [n.outputs[0] for n, _, _ in smooth.norm_targets(model.graph, ())] + \
        [mul.outputs[0] for _, mul, _ in smooth.mlp_targets(model.graph, ())]
    assert len(values) >= 4
    feeds: dict[str, np.ndarray] = {}
    runs: list[int] = []
    real_run, real_segments = smooth._run_segments, smooth._segments

    def spy_run(model, values, given, *, segment_bytes):
        feeds.update(given)
        return real_run(model, values, given, segment_bytes=segment_bytes)

    def spy_segments(nodes, budget):
        out = real_segments(nodes, budget)
        runs.append(len(out))
        return out

    monkeypatch.setattr(smooth, "_run_segments", spy_run)
    monkeypatch.setattr(smooth, "_segments", spy_segments)
    # a budget of a few KB: tiny's weights (64 x 64 fp32 = 16 KB) each run nearly alone
    got = smooth._calibrate(model, values, tokens=256, seed=0, segment_bytes=20_000)
    assert runs[0] >= 10
    want = _whole_model_statistics(fp32, [v.name for v in values], feeds)
    for g, w in zip(got, want):          # the same kernels on the same inputs: the same bits
        np.testing.assert_array_equal(g, w)


# -- chunks along N -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,symmetric,search", [(4, False, True), (8, True, False), (4, True, True)])
def test_blockwise_chunks_change_no_bit(monkeypatch, bits, symmetric, search):
    from edgellama.quant import blockwise

    w = np.random.default_rng(0).standard_normal((96, 70)).astype(np.float32)
    whole = blockwise.quantize(w, bits=bits, block_size=32, symmetric=symmetric, search=search)
    monkeypatch.setattr(common, "CHUNK_BYTES", 96 * 4 * 3)          # 3 columns a chunk: 24 chunks
    reads: list[tuple[int, int]] = []

    def read(a, b):
        reads.append((a, b))
        return w[:, a:b]
    chunked = blockwise.quantize(common.Columns(96, 70, read), bits=bits, block_size=32, symmetric=symmetric,
                                 search=search)
    assert len(reads) == 24 and max(b - a for a, b in reads) == 3
    assert np.array_equal(whole.data, chunked.data) and np.array_equal(whole.scales, chunked.scales)
    if whole.zero_points is not None:
        assert np.array_equal(whole.zero_points, chunked.zero_points)


def test_smoothed_and_widened_weights_read_in_parts_equal_the_whole(tmp_path_factory, monkeypatch):
    """A part of a lazy weight (widened, then scaled twice as up_proj is) is the same part of the whole."""
    _, fp16 = _pair(tmp_path_factory, "portable", "dynamic")
    model = folder.load_model_ir(fp16)
    widen.apply(model)
    smooth.apply(model, mlp=True)
    up = next(v for name, v in model.graph.initializers.items() if name.endswith("mlp.up_proj.weight"))
    whole = common.read(up.const_value)
    monkeypatch.setattr(common, "CHUNK_BYTES", 256)
    assert np.array_equal(common.read(up.const_value), whole)          # assembled from parts
    rows = np.array([5, 0, 17])
    assert np.array_equal(common.part(up.const_value, 0, rows), whole[rows])
    assert np.array_equal(common.part(up.const_value, 1, slice(3, 40)), whole[:, 3:40])


def test_the_fp16_folder_quantizes_the_same_with_tiny_chunks_and_segments(tmp_path_factory, tmp_path, monkeypatch):
    _, fp16 = _pair(tmp_path_factory, "ort", "static")
    plain = quantize_folder(fp16, tmp_path / "plain", mode="int4")
    monkeypatch.setattr(common, "CHUNK_BYTES", 512)
    monkeypatch.setattr(smooth, "SEGMENT_BYTES", 20_000)
    small = quantize_folder(fp16, tmp_path / "small", mode="int4")
    assert _sha(plain / folder.DATA) == _sha(small / folder.DATA)


def test_widen_splits_the_skip_norms_only_where_the_fp32_lowering_refuses_them(tmp_path_factory):
    """fp32 on the CPU refuses ORT's Skip norm (export/lower/ort_norm.py): widen splits each back into
    Add + SimplifiedLayerNormalization; for CUDA, whose fp32 export keeps it, it stays."""
    _, fp16 = _pair(tmp_path_factory, "ort", "static")
    skip = ("com.microsoft", "SkipSimplifiedLayerNormalization")
    for provider, kept in (("cpu", 0), ("cuda", None)):
        model = folder.load_model_ir(fp16)
        fused = sum((n.domain, n.op_type) == skip for n in model.graph)
        assert fused > 0
        record = widen.apply(model, provider=provider)
        left = sum((n.domain, n.op_type) == skip for n in model.graph)
        assert left == (fused if kept is None else kept)
        assert record["skip_norms_split"] == fused - left
