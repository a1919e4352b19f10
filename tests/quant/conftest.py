"""Shared helpers of the tests/quant/test_quant_*.py files: tiny exports, ORT logits, KL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgellama.folder import TARGETS  # noqa: F401  (the tests parametrize over it)
from tests.conftest import OrtLoop, ort_session, shared_export


def shared_tiny(tmp_path_factory, target: str = "portable") -> Path:
    """The session's tiny fp32 export of `target` (2 layers: 7*2+1 = 15 weight MatMuls and one
    embedding Gather); the tests only read it.

    The dynamic KV cache contract (ort's default is static since issue 11): these tests count its
    q/k/v MatMuls and feed its position_ids; static folders are quantized in tests/runtime/test_static_cache.py."""
    return shared_export(tmp_path_factory, "tiny", target=target, kv_cache="dynamic")


_TIED: dict[str, Path] = {}


def tied_tiny_folder(tmp_path_factory) -> Path:
    """An fp32 folder of tiny with a tied embedding (torch seed 0, torch's default init: the embedding
    and lm_head one tensor), written once per session: test_quant_int8's tied test and
    test_rss_tied_table read the same one instead of tracing and writing it each (~3 CPU s a trace)."""
    if "tied" not in _TIED:
        import torch

        from edgellama import folder
        from edgellama.contract import describe_io
        from edgellama.export import config
        from edgellama.export.model import Llama
        from edgellama.export.onnx_export import export_onnx

        torch.manual_seed(0)
        model = Llama(config.tiny(tie_word_embeddings=True))
        src = tmp_path_factory.mktemp("tied") / "fp32"
        ir_model = export_onnx(model)
        with folder.staged_folder(src, force=False) as tmp:
            folder.save_model(ir_model, tmp)
            folder.write_manifest(tmp, folder.Manifest(config=model.config.to_dict(), io=describe_io(ir_model)))
        _TIED["tied"] = src
    return _TIED["tied"]


def quantized_pair(tmp_path_factory, target: str, mode: str) -> tuple[Path, Path]:
    """(the shared tiny fp32 export of `target`, its quantization by `mode`)."""
    fp32 = shared_tiny(tmp_path_factory, target)
    from edgellama.quant.api import quantize_folder

    return fp32, quantize_folder(fp32, tmp_path_factory.mktemp(f"{mode}-{target}") / mode, mode=mode)


def session(folder: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])


def logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """Prefill logits [B, S, V] (fp32) of `ids` [B, S] with an empty cache."""
    s = session(folder)
    b, n = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64),
             "position_ids": np.broadcast_to(np.arange(n), (b, n)).copy()}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            dt = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), dt)
    out = s.run(["logits"], feeds)[0]
    assert out.dtype == np.float32
    return out


def mean_kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(ref || cand) of the next-token distributions."""
    def lsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    a, b = lsm(ref), lsm(cand)
    return float((np.exp(a) * (a - b)).sum(-1).mean())


def nodes(folder: Path, op: str) -> dict:
    """The folder's `op` nodes (onnx NodeProto) by name, the graph read without its weights."""
    import onnx

    model = onnx.load(Path(folder) / "model.onnx", load_external_data=False)
    return {n.name: n for n in model.graph.node if n.op_type == op}


def weight_bytes(folder: Path) -> int:
    return os.path.getsize(Path(folder) / "model.onnx.data")


def ids(batch: int = 2, seq: int = 24, vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, seq)).astype(np.int64)


# -- the MatMulNBits layout, read back (blockwise.Packed) --------------------------------------------
def unpacked(packed) -> np.ndarray:
    """The integer codes [N, n_blocks, block] (uint8, 0..2^bits-1)."""
    if packed.bits == 8:
        return packed.data
    q = np.empty(packed.data.shape[:-1] + (packed.block_size,), np.uint8)
    q[..., 0::2] = packed.data & 0x0F
    q[..., 1::2] = packed.data >> 4
    return q


def dequantize(packed) -> np.ndarray:
    """W [K, N] float32 as the kernel reconstructs it."""
    zp = packed.zero_points if packed.zero_points is not None else np.full(packed.scales.shape, 1 << (packed.bits - 1))
    w = (unpacked(packed).astype(np.float32) - zp[..., None].astype(np.float32)) * packed.scales[..., None]
    return np.ascontiguousarray(w.reshape(packed.n, -1)[:, : packed.k].T)


def kernel_matmul(packed, a: np.ndarray) -> np.ndarray:
    """Run one MatMulNBits node on ORT CPU with `packed` as its weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(packed.data, "B"), numpy_helper.from_array(packed.scales.reshape(-1), "S")]
    inputs = ["A", "B", "S"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points_packed(), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=packed.k, N=packed.n,
                            bits=packed.bits, block_size=packed.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, packed.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def prefill_logits(ir_model, config, path: Path) -> np.ndarray:
    """The logits of one 8-token prefill of an in-memory model (saved under `path`) on ONNX Runtime's CPU."""
    loop = OrtLoop(ort_session(ir_model, path), config)
    ids = np.arange(1, 9, dtype=np.int64)[None]
    return loop.step(ids, np.ones_like(ids), loop.empty(1))[0]
