"""Smoothing factors folded into the RMSNorm weights (SmoothQuant, Xiao et al. 2022, eq. 4).

With int8 activations (MatMulNBits accuracy_level 4 quantizes A per block of K), a few
activation channels with large magnitudes set the scale of their block and flatten the others.
For a MatMul fed by an RMSNorm, `norm(x) * gamma @ W == norm(x) * (gamma / s) @ (diag(s) W)` for
any positive per-channel `s`, exact in real arithmetic; choosing
`s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` moves part of the activations' range into the
weights, where it is quantized offline with per-block scales.

Calibration is data-free: one prefill of random token ids through the fp32 model (ONNX
Runtime, CPU) gives the per-channel max of each norm's output. Outlier channels of these models
are properties of the weights (the same channels light up whatever the text): on smollm2 random
tokens and English text gave the same gain (int8 mean KL 4.6e-3 -> 3.1e-3).

Only norms whose output feeds nothing but weight MatMuls, and whose weight no other node reads,
are smoothed (q/k/v after input_layernorm, gate/up after post_attention_layernorm); the final
norm feeds the tied lm_head / embedding table and is left alone.

The same identity holds inside the MLP, where the worst outliers are (down_proj's input, the
SwiGLU product `act(gate) * up`, is linear in `up`): `(act * (up / s)) @ (diag(s) W_down)`, so
dividing up_proj's output column j by s_j and multiplying down_proj's row j by s_j is exact.
Whether it pays depends on the pass (smollm2, 4,096 tokens, against fp32 torch, alpha 0.5):
int4 mean KL 0.173 with the norms alone -> 0.130 with the MLP pairs too (alpha 0.3: 0.147, 0.7:
0.172); int8 KL 3.07e-3 -> 2.90e-3 but top-1 96.95% -> 96.29% and perplexity worse; int8-dynamic
+2.57% -> +3.48% perplexity. So `mlp=True` is int4's choice only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from edgellama.quant import common

# (domain, op) -> index of the per-channel scale (gamma) input, for each target's RMSNorm.
NORMS = {("edgellama", "RMSNorm"): 1, ("", "SimplifiedLayerNormalization"): 1,
         ("com.microsoft", "SkipSimplifiedLayerNormalization"): 2, ("", "RMSNormalization"): 1}
ALPHA = 0.5
CALIBRATION_TOKENS = 512


def _only_reader(value: ir.Value) -> bool:
    return len(value.uses()) == 1


def norm_targets(graph: ir.Graph, exclude: Sequence[str]) -> list[tuple[ir.Node, int, list[ir.Node]]]:
    """(norm, gamma input index, the weight MatMuls reading the norm) for each norm that can be smoothed."""
    found = []
    for n in graph:
        idx = NORMS.get((n.domain or "", n.op_type))
        if idx is None or len(n.inputs) <= idx or not common.is_float_initializer(n.inputs[idx]):
            continue
        out = n.outputs[0]
        if not _only_reader(n.inputs[idx]) or not out.uses() or out.is_graph_output():
            continue
        read = _through_row_pick(out)
        users = [u.node for u in read.uses()]
        if all(common.is_op(u, "MatMul") and u.inputs[0] is read and u.inputs[1].is_initializer()
               and _only_reader(u.inputs[1]) and not common.excluded(u, exclude) for u in users):
            found.append((n, idx, users))
    return found


def _through_row_pick(value: ir.Value) -> ir.Value:
    """The value the weight MatMuls read for `value`: past the static KV cache graph's last-position
    pick (Reshape -> Gather of rows -> Unsqueeze, export/lower/ort_static.py) when that is its one
    reader. The pick only selects rows, so a per-channel factor folds through it unchanged."""
    chain = (("Reshape", 0), ("Gather", 0), ("Unsqueeze", 0))
    current = value
    for op_type, index in chain:
        uses = current.uses()
        if len(uses) != 1 or not common.is_op(uses[0].node, op_type) or uses[0].idx != index:
            return value
        node = uses[0].node
        if op_type == "Gather" and (node.attributes.get("axis") is None or node.attributes["axis"].as_int() != 0):
            return value
        current = node.outputs[0]
    return value if current.is_graph_output() else current


def mlp_targets(graph: ir.Graph, exclude: Sequence[str]) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
    """(up MatMul, product Mul, down MatMul) triples: down reads `Mul(act, up)` and nothing else
    reads up's output, the product, or either weight."""
    def weight_matmul(n: ir.Node | None) -> bool:
        return (n is not None and common.is_op(n, "MatMul") and common.is_float_initializer(n.inputs[1])
                and _only_reader(n.inputs[1]) and not common.excluded(n, exclude))

    found = []
    for down in graph:
        if not weight_matmul(down):
            continue
        mul = down.inputs[0].producer()
        if mul is None or mul.op_type != "Mul" or not _only_reader(mul.outputs[0]) or mul.outputs[0].is_graph_output():
            continue
        ups = [i.producer() for i in mul.inputs]
        ups = [u for u in ups if weight_matmul(u) and _only_reader(u.outputs[0]) and not u.outputs[0].is_graph_output()]
        if len(ups) == 1 and mul.inputs[0] is not mul.inputs[1]:
            found.append((ups[0], mul, down))
    return found


def _calibrate(model: ir.Model, values: list[ir.Value], *, tokens: int, seed: int) -> list[np.ndarray]:
    """Per-channel max |value| of each value over one prefill of random token ids."""
    graph = model.graph
    vocab = next(v.const_value.shape[0] for v in graph.initializers.values()
                 if any(u.node.op_type == "Gather" and u.idx == 0 for u in v.uses()))
    untyped = [v for v in values if v.type is None]
    for v in untyped:
        v.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.extend(values)
    try:
        sess = _session(model)
    finally:
        for _ in values:
            graph.outputs.pop()
        for v in untyped:
            v.type = None
    # Rows of 128 tokens: within any model's context (tiny's is 256).
    b, n = max(1, tokens // 128), min(tokens, 128)
    ids = np.random.default_rng(seed).integers(0, vocab, (b, n)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64)}
    names = [i.name for i in sess.get_inputs()]
    # The static KV cache contract has no position_ids and takes the whole cache buffer as its past
    # (n slots here); the dynamic one an empty past.
    static = "position_ids" not in names
    if not static:
        feeds["position_ids"] = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((b, i.shape[1], n if static else 0, i.shape[3]), dtype)
    outs = sess.run([v.name for v in values], feeds)
    # Only the statistics are kept: the session's weights go, and so do the file mappings an
    # external weight opened for it.
    del sess
    for v in graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            v.const_value.release()
    return [np.abs(x.reshape(-1, x.shape[-1])).max(0).astype(np.float64) for x in outs]


def _session(model: ir.Model):
    """An ONNX Runtime CPU session of `model`, built in memory: the graph is serialized with every
    initializer as an external reference and ONNX Runtime reads the weights from the numpy arrays
    (no copy through the disk, and no 2 GB protobuf limit)."""
    import onnxruntime as ort

    weights = {name: v.const_value for name, v in model.graph.initializers.items()}
    arrays = {name: t.numpy() for name, t in weights.items()}
    try:
        for name, v in model.graph.initializers.items():
            t = weights[name]
            v.const_value = ir.ExternalTensor("in-memory", 0, arrays[name].nbytes, t.dtype, shape=t.shape, name=name)
        proto = ir.to_proto(model)
    finally:
        for name, v in model.graph.initializers.items():
            v.const_value = weights[name]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
    so.add_external_initializers(list(arrays), values)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # ONNX Runtime reads the weights from these buffers without a copy: they live as long as the session.
    sess.edgellama_weights = values
    return sess


def apply(model: ir.Model, *, alpha: float = ALPHA, tokens: int = CALIBRATION_TOKENS, seed: int = 0,
          exclude: Sequence[str] = (), mlp: bool = False) -> dict:
    """Fold smoothing factors into `model` (fp32, in place); returns the manifest's record."""
    graph = model.graph
    targets = norm_targets(graph, exclude)
    mlps = mlp_targets(graph, exclude) if mlp else []
    if not targets and not mlps:
        return {"smoothing": None}
    # One calibration pass before any edit: every fold below is exact, so the order is free.
    values = [n.outputs[0] for n, _, _ in targets] + [mul.outputs[0] for _, mul, _ in mlps]
    amaxes = _calibrate(model, values, tokens=tokens, seed=seed)

    def f64(v: ir.Value) -> np.ndarray:
        return common.array(v).astype(np.float64)

    def amax_rows(v: ir.Value) -> np.ndarray:
        # |w| and its max are exact in fp32: the same factors as from a float64 copy, without one
        return np.abs(common.array(v)).max(1).astype(np.float64)

    def scaled(v: ir.Value, factor: Callable[[np.ndarray], np.ndarray]) -> None:
        # The scaled weight is computed when written (streaming, see common.py), from the value the
        # weight holds now: a later fold of the same weight composes with this one.
        common.set_lazy(v, lambda source=v.const_value: factor(common.read(source).astype(np.float64)).astype(np.float32))

    for (norm, idx, users), amax in zip(targets, amaxes):
        gamma = f64(norm.inputs[idx])
        wmax = np.max([amax_rows(u.inputs[1]) for u in users], axis=0)          # per input channel
        s = _factors(amax, wmax, alpha)
        common.set_array(norm.inputs[idx], (gamma / s).astype(np.float32))
        for u in users:
            scaled(u.inputs[1], lambda w, s=s: w * s[:, None])
    for (up, _mul, down), amax in zip(mlps, amaxes[len(targets):]):
        s = _factors(amax, amax_rows(down.inputs[1]), alpha)          # up [K, I], down [I, N]
        scaled(up.inputs[1], lambda w, s=s: w / s[None, :])
        scaled(down.inputs[1], lambda w, s=s: w * s[:, None])
    return {"smoothing": {"alpha": alpha, "norms": len(targets), "mlp": len(mlps),
                          "calibration": f"{tokens} random token ids in rows of 128, seed {seed}"}}


def _factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), scaled to geometric mean 1 so that overall
    magnitudes (and fp32 range) stay where they were."""
    s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return s / np.exp(np.log(s).mean())
