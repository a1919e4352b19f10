"""Each fp32 CPU kernel a target lowers to, alone, against fp64: at least as accurate as
transformers' own torch code for the same block (within ACCURACY_RATIO, RMS error over a few
million elements, so one unlucky element cannot decide it). The Skip norm kernel that
`ort_norm.py` refuses at fp32 on the CPU is measured too: the refusal holds while it is worse.

End to end (tests/export/test_export_parity.py) the same question is asked of a 30-layer model,
where many roundings mix; here each kernel answers it alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

ACCURACY_RATIO = 1.25
EPS = 1e-5


def session(nodes, inputs, outputs):
    """A bare CPU session on one small graph (fp32 tensors, int64 where the name says `pos`)."""
    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64 if name == "pos" else TensorProto.FLOAT, None)

    graph = helper.make_graph(nodes, "kernel", [info(n) for n in inputs], [info(n) for n in outputs])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def rms_error(x, exact) -> float:
    return float(np.sqrt(((x.astype(np.float64) - exact) ** 2).mean()))


# -- RMSNorm of a residual sum ------------------------------------------------------------------------
HIDDEN = 576


@pytest.fixture(scope="module")
def norm_case():
    """(feed, fp64 answer, torch's error): RMSNorm(residual + branch) with transformers' LlamaRMSNorm."""
    rng = np.random.default_rng(0)   # each case its own stream: the data do not depend on which tests run
    x = (rng.standard_normal((1, 2048, HIDDEN)) * 3).astype(np.float32)
    skip = (rng.standard_normal((1, 2048, HIDDEN)) * 3).astype(np.float32)
    gamma = rng.standard_normal(HIDDEN).astype(np.float32)
    total = x.astype(np.float64) + skip
    exact = total / np.sqrt((total ** 2).mean(-1, keepdims=True) + EPS) * gamma
    norm = LlamaRMSNorm(HIDDEN, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        ref = norm(torch.from_numpy(x) + torch.from_numpy(skip)).numpy()
    return {"x": x, "skip": skip, "gamma": gamma}, exact, rms_error(ref, exact)


NORMS = {
    "SimplifiedLayerNormalization": [helper.make_node("Add", ["x", "skip"], ["sum"]),
                                     helper.make_node("SimplifiedLayerNormalization", ["sum", "gamma"], ["y"],
                                                      epsilon=EPS, axis=-1, stash_type=1)],
    "RMSNormalization": [helper.make_node("Add", ["x", "skip"], ["sum"]),
                         helper.make_node("RMSNormalization", ["sum", "gamma"], ["y"], epsilon=EPS, axis=-1)],
}
SKIP_NORM = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y", "", "", "sum"],
                              domain="com.microsoft", epsilon=EPS)]


@pytest.mark.parametrize("kernel", list(NORMS))
def test_norm_kernels_we_lower_to_are_as_accurate_as_torch(norm_case, kernel):
    feed, exact, torch_err = norm_case
    err = rms_error(session(NORMS[kernel], list(feed), ["y"]).run(["y"], feed)[0], exact)
    print(f"{kernel}: rms error vs fp64 {err:.3e}, torch {torch_err:.3e}")
    assert err <= ACCURACY_RATIO * torch_err


def test_the_fp32_skip_norm_kernel_is_why_ort_norm_refuses_it(norm_case):
    """If ONNX Runtime's kernel stops summing serially this fails: then ort_norm.py can fuse fp32 again."""
    feed, exact, torch_err = norm_case
    out, total = session(SKIP_NORM, list(feed), ["y", "sum"]).run(["y", "sum"], feed)
    assert np.array_equal(total, feed["x"] + feed["skip"])   # the residual sum itself is exact fp32
    err = rms_error(out, exact)
    print(f"SkipSimplifiedLayerNormalization: rms error vs fp64 {err:.3e}, torch {torch_err:.3e}")
    assert err > ACCURACY_RATIO * torch_err


# -- rotary embedding -------------------------------------------------------------------------------
HEADS, HEAD_DIM, POSITIONS = 9, 64, 8192


@pytest.fixture(scope="module")
def rotary_case():
    """(feed, fp64 answer, torch's error): transformers' apply_rotary_pos_emb on fp32 cos/sin tables."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1024, HEADS * HEAD_DIM)).astype(np.float32)
    pos = rng.integers(0, POSITIONS, (1, 1024)).astype(np.int64)
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
    angles = torch.outer(torch.arange(POSITIONS).float(), inv_freq)
    cos, sin = angles.cos().numpy(), angles.sin().numpy()          # [P, D/2], as the exporter stores them

    heads = x.reshape(1, 1024, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)   # [B, H, S, D]
    c = np.concatenate([cos[pos], cos[pos]], -1)[:, None]           # [B, 1, S, D]
    s = np.concatenate([sin[pos], sin[pos]], -1)[:, None]
    h64 = heads.astype(np.float64)
    half = np.concatenate([-h64[..., HEAD_DIM // 2:], h64[..., :HEAD_DIM // 2]], -1)
    exact = (h64 * c + half * s).transpose(0, 2, 1, 3).reshape(x.shape)
    t = torch.from_numpy(np.ascontiguousarray(heads))
    ref, _ = apply_rotary_pos_emb(t, t, torch.from_numpy(c[:, 0]), torch.from_numpy(s[:, 0]))
    ref = ref.numpy().transpose(0, 2, 1, 3).reshape(x.shape)
    return {"x": x, "pos": pos, "cos": cos, "sin": sin}, exact, rms_error(ref, exact)


ROTARIES = {
    "com.microsoft.RotaryEmbedding": helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"],
                                                      domain="com.microsoft", num_heads=HEADS,
                                                      rotary_embedding_dim=HEAD_DIM, interleaved=0),
    "RotaryEmbedding-23": helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], num_heads=HEADS),
}


@pytest.mark.parametrize("kernel", list(ROTARIES))
def test_rotary_kernels_we_lower_to_are_as_accurate_as_torch(rotary_case, kernel):
    feed, exact, torch_err = rotary_case
    err = rms_error(session([ROTARIES[kernel]], list(feed), ["y"]).run(["y"], feed)[0], exact)
    print(f"{kernel}: rms error vs fp64 {err:.3e}, torch {torch_err:.3e}")
    assert err <= ACCURACY_RATIO * torch_err


# -- MatMul ----------------------------------------------------------------------------------------
def test_matmul_is_as_accurate_as_torchs_gemm():
    """ONNX Runtime's fp32 MatMul against torch's Linear on the same rows (a GEMM). Torch gives a
    single row (a decode step) a matrix-vector path that is printed beside: it accumulates more
    finely than either GEMM, so per-kernel comparisons at one row would measure that path."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, HIDDEN)) * 2).astype(np.float32)
    w = (rng.standard_normal((8192, HIDDEN)) * 0.05).astype(np.float32)        # [out, in], as Linear
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    gemm = rms_error(torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy(), exact)
    rows = np.concatenate([torch.nn.functional.linear(torch.from_numpy(x[i:i + 1]), torch.from_numpy(w)).numpy()
                           for i in range(len(x))])
    sess = session([helper.make_node("MatMul", ["x", "w"], ["y"])], ["x", "w"], ["y"])
    err = rms_error(sess.run(["y"], {"x": x, "w": np.ascontiguousarray(w.T)})[0], exact)
    print(f"MatMul: rms error vs fp64 {err:.3e}, torch GEMM {gemm:.3e}, torch one row at a time "
          f"{rms_error(rows, exact):.3e}")
    assert err <= ACCURACY_RATIO * gemm


# -- SiLU (the SwiGLU activation) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def silu_case():
    """(x, fp64 answer, torch's error): F.silu on gate activations of a Llama MLP's spread."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2048, 1536)) * 4).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = x64 / (1.0 + np.exp(-x64))
    return x, exact, rms_error(torch.nn.functional.silu(torch.from_numpy(x)).numpy(), exact)


def silu_graph(kind: str) -> list:
    if kind == "sigmoid":   # what torch.onnx writes for F.silu; ONNX Runtime fuses it into QuickGelu
        return [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    return [one, helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Exp", ["n"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["d"]), helper.make_node("Div", ["x", "d"], ["y"])]


def test_the_silu_we_export_is_as_accurate_as_torch(silu_case):
    """What export/onnx_export.py translates F.silu to: x / (1 + exp(-x))."""
    x, exact, torch_err = silu_case
    y = session(silu_graph("exact"), ["x"], ["y"]).run(["y"], {"x": x})[0]
    err = rms_error(y, exact)
    print(f"SiLU as x / (1 + exp(-x)): rms error vs fp64 {err:.3e}, torch {torch_err:.3e}")
    assert err <= ACCURACY_RATIO * torch_err
    assert np.isfinite(y).all()


def test_sigmoid_times_x_is_why_the_export_does_not_write_it(silu_case):
    """If ONNX Runtime's fused Sigmoid * Mul becomes as accurate as torch this fails: then the
    exporter's own x * Sigmoid(x) (one fused kernel, not four) can come back."""
    x, exact, torch_err = silu_case
    err = rms_error(session(silu_graph("sigmoid"), ["x"], ["y"]).run(["y"], {"x": x})[0], exact)
    print(f"SiLU as x * Sigmoid(x): rms error vs fp64 {err:.3e}, torch {torch_err:.3e}")
    assert err > torch_err
