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

from edgellama.export.lower.ort_static import LAST_HIDDEN
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
    """The value the weight MatMuls read for `value`: the static KV cache graph's last-position pick
    when that is `value`'s one reader, found by the name the export gives its output (LAST_HIDDEN,
    export/lower/ort_static.py) rather than by its exact chain, which has changed (an Unsqueeze
    before `logits_to_keep`, a Reshape since). Every node on the way must have one reader and only
    select or reshape rows (Reshape, Unsqueeze, a Gather on axis 0), so a per-channel factor folds
    through it unchanged."""
    current = value
    for _ in range(4):
        uses = current.uses()
        if len(uses) != 1 or uses[0].idx != 0:
            return value
        node = uses[0].node
        row_gather = common.is_op(node, "Gather") and node.attributes.get("axis") is not None \
            and node.attributes["axis"].as_int() == 0
        if not (row_gather or common.is_op(node, "Reshape") or common.is_op(node, "Unsqueeze")):
            return value
        current = node.outputs[0]
        if current.name == LAST_HIDDEN:
            return current
    return value


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


# Initializer bytes (float32) one calibration segment may hold (ONNX Runtime holds them twice:
# the arrays handed in and its pre-packed copy): an 8B layer's weights (~870 MB) take about four
# segments, every MLP projection (235 MB) fits. A single larger initializer runs alone. Tests
# lower it to force many segments.
SEGMENT_BYTES = 256 << 20


def _calibrate(model: ir.Model, values: list[ir.Value], *, tokens: int, seed: int,
               segment_bytes: int | None = None) -> list[np.ndarray]:
    """Per-channel max |value| of each value over one prefill of random token ids.

    Run segment by segment (`_segments`), never the whole model at once: only the nodes `values`
    depend on, in graph order, cut into runs of at most `segment_bytes` of initializers; each
    runs as its own ONNX Runtime CPU session, fed what earlier segments produced and still
    needed, and its weights are dropped before the next. The embedding Gather is done in numpy
    from the rows the token ids pick. Peak memory: one segment's weights and the live activations."""
    graph = model.graph
    vocab = next(v.const_value.shape[0] for v in graph.initializers.values()
                 if any(u.node.op_type == "Gather" and u.idx == 0 for u in v.uses()))
    inputs = {v.name: v for v in graph.inputs}
    # Rows of 128 tokens: within any model's context (tiny's is 256).
    b, n = max(1, tokens // 128), min(tokens, 128)
    ids = np.random.default_rng(seed).integers(0, vocab, (b, n)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64)}
    # The static KV cache contract has no position_ids and takes the whole cache buffer as its past
    # (n slots here); the dynamic one an empty past.
    static = "position_ids" not in inputs
    if not static:
        feeds["position_ids"] = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
    for name, v in inputs.items():
        if name.startswith("past_key_values."):
            dtype = np.float16 if v.dtype == ir.DataType.FLOAT16 else np.float32
            feeds[name] = np.zeros((b, int(v.shape[1]), n if static else 0, int(v.shape[3])), dtype)
    stats = _run_segments(model, values, feeds, segment_bytes=SEGMENT_BYTES if segment_bytes is None else segment_bytes)
    return [stats[v.name] for v in values]


def _initializer_bytes(value: ir.Value) -> int:
    t = value.const_value
    return int(np.prod([int(d) for d in t.shape], dtype=np.int64)) * max(1, t.dtype.itemsize)


def _numpy_gather(node: ir.Node, live: dict[str, np.ndarray]) -> bool:
    """A row Gather of a 2-D initializer with indices already computed: the embedding lookup."""
    if not _table_gather(node) or len(node.inputs) != 2 or node.inputs[1] is None:
        return False
    axis = node.attributes.get("axis")
    return ((axis.as_int() if axis is not None else 0) == 0
            and node.inputs[1].name in live and not node.inputs[1].is_initializer())


def _table_gather(node: ir.Node) -> bool:
    """A Gather from a 2-D initializer (an embedding table): a segment of its own."""
    table = node.inputs[0] if node.inputs else None
    return (common.is_op(node, "Gather") and table is not None and table.is_initializer()
            and table.const_value is not None and len(table.const_value.shape) == 2)


def _segments(nodes: list[ir.Node], budget: int) -> list[list[ir.Node]]:
    """Consecutive runs of `nodes` holding at most `budget` initializer bytes (a node whose own
    initializers exceed it alone); a row Gather of a 2-D table is a run of its own."""
    runs: list[list[ir.Node]] = []
    current: list[ir.Node] = []
    held: set[str] = set()
    size = 0
    for node in nodes:
        if _table_gather(node):
            if current:
                runs.append(current)
            runs.append([node])
            current, held, size = [], set(), 0
            continue
        inits = {i.name: _initializer_bytes(i) for i in node.inputs
                 if i is not None and i.is_initializer() and i.const_value is not None}
        extra = sum(b for name, b in inits.items() if name not in held)
        if current and size + extra > budget:
            runs.append(current)
            current, held, size = [], set(), 0
            extra = sum(inits.values())
        current.append(node)
        held |= set(inits)
        size += extra
    if current:
        runs.append(current)
    return runs


def _run_segments(model: ir.Model, values: list[ir.Value], feeds: dict[str, np.ndarray], *,
                  segment_bytes: int) -> dict[str, np.ndarray]:
    import onnx

    graph = model.graph
    wanted = {v.name for v in values}
    # The nodes the statistics depend on, in graph (topological) order.
    needed: set[ir.Node] = set()
    stack = [v.producer() for v in values if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(i.producer() for i in node.inputs if i is not None and i.producer() is not None)
    order = {node: i for i, node in enumerate(graph)}
    nodes = sorted(needed, key=order.__getitem__)
    runs = _segments(nodes, segment_bytes)
    last_use: dict[str, int] = {}
    for r, run in enumerate(runs):
        for node in run:
            for i in node.inputs:
                if i is not None:
                    last_use[i.name] = r
    protos = _node_protos(model)
    live = {k: v for k, v in feeds.items() if k in last_use}
    stats: dict[str, np.ndarray] = {}
    for r, run in enumerate(runs):
        if len(run) == 1 and _numpy_gather(run[0], live):
            node = run[0]
            idx = live[node.inputs[1].name]
            rows = common.part(node.inputs[0].const_value, 0, idx.reshape(-1))
            out = {node.outputs[0].name: rows.reshape(idx.shape + rows.shape[1:])}
        else:
            out = _run_segment(model, run, protos, live, last_use, wanted, r, onnx, order)
        for name, x in out.items():
            if name in wanted:
                stats[name] = np.abs(x.reshape(-1, x.shape[-1])).max(0).astype(np.float64)
            if last_use.get(name, -1) > r:
                live[name] = x
        for name in [k for k in live if last_use.get(k, -1) <= r]:
            del live[name]
    return stats


def _node_protos(model: ir.Model) -> dict[str, object]:
    """The model's ModelProto with every initializer an external placeholder (no weight bytes)."""
    weights = {name: v.const_value for name, v in model.graph.initializers.items()}
    try:
        for name, v in model.graph.initializers.items():
            t = weights[name]
            v.const_value = ir.ExternalTensor("in-memory", 0, _initializer_bytes(v), t.dtype, shape=t.shape, name=name)
        proto = ir.to_proto(model)
    finally:
        for name, v in model.graph.initializers.items():
            v.const_value = weights[name]
    return {"model": proto, "nodes": list(proto.graph.node),
            "initializers": {i.name: i for i in proto.graph.initializer}}


def _run_segment(model, run, protos, live, last_use, wanted, r, onnx, index) -> dict[str, np.ndarray]:
    """One segment as its own session: inputs are what it reads from earlier segments (or the
    feeds), outputs what later segments or the statistics need, weights handed in as arrays;
    `index` is the graph's node order (_run_segments computes it once for every segment)."""
    import onnxruntime as ort

    produced = {o.name for node in run for o in node.outputs}
    reads, inits = [], []
    for node in run:
        for i in node.inputs:
            if i is None or i.name in produced or i.name in reads or i.name in inits:
                continue
            if i.name in live:
                reads.append(i.name)
            elif i.is_initializer():
                inits.append(i.name)
            else:
                raise AssertionError(f"calibration segment {r}: {i.name} is neither fed nor computed before")
    outs = [o.name for node in run for o in node.outputs
            if o.name in wanted or last_use.get(o.name, -1) > r]
    base = protos["model"]
    g = onnx.helper.make_graph(
        [protos["nodes"][index[node]] for node in run], f"segment{r}",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(live[name].dtype), None)
         for name in reads],
        [onnx.ValueInfoProto(name=name) for name in outs],
        [protos["initializers"][name] for name in inits])
    m = onnx.helper.make_model(g, opset_imports=list(base.opset_import), functions=list(base.functions),
                               ir_version=base.ir_version)
    arrays = {name: np.asarray(common.read(model.graph.initializers[name].const_value), order="C") for name in inits}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Pre-packing stays on although it copies each MatMul weight once more: without it MLAS takes
    # other GEMM kernels and the statistics move by ~1e-6 (relative), which changes quantized
    # bytes; with it they are bit for bit the whole-model session's. SEGMENT_BYTES counts for it.
    ort_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    so.add_external_initializers(list(arrays), ort_values)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    result = sess.run(outs, {name: live[name] for name in reads})
    del sess, ort_values, arrays
    return dict(zip(outs, result))


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
        # |w| and its max are exact in fp32: the same factors as from a float64 copy, without one;
        # read a chunk of columns at a time (an 8B lm_head is 2.1 GB in fp32)
        t = v.const_value
        k, n = (int(d) for d in t.shape)
        out = np.zeros(k, np.float32)
        for cols in common.column_chunks(k, n):
            np.maximum(out, np.abs(common.part(t, 1, cols)).max(1), out=out)
        return out.astype(np.float64)

    def scaled(v: ir.Value, s: np.ndarray, axis: int, divide: bool) -> None:
        # The scaled weight is computed when written (streaming, see common.py), from the value the
        # weight holds now: a later fold of the same weight composes with this one. `s` runs along
        # `axis` of the [K, N] weight; a part along either axis is the same part of the whole
        # product (elementwise, so the bits are those of the whole computation).
        source = v.const_value

        def part(at: int, index: common.Index, source=source) -> np.ndarray:
            w = common.part(source, at, index).astype(np.float64)
            f = s[index] if at == axis else s
            f = f[:, None] if axis == 0 else f[None, :]
            return (w / f if divide else w * f).astype(np.float32)
        common.set_lazy(v, None, part=part)

    for (norm, idx, users), amax in zip(targets, amaxes):
        gamma = f64(norm.inputs[idx])
        wmax = np.max([amax_rows(u.inputs[1]) for u in users], axis=0)          # per input channel
        s = _factors(amax, wmax, alpha)
        common.set_array(norm.inputs[idx], (gamma / s).astype(np.float32))
        for u in users:
            scaled(u.inputs[1], s, 0, divide=False)
    for (up, _mul, down), amax in zip(mlps, amaxes[len(targets):]):
        s = _factors(amax, amax_rows(down.inputs[1]), alpha)          # up [K, I], down [I, N]
        scaled(up.inputs[1], s, 1, divide=True)
        scaled(down.inputs[1], s, 0, divide=False)
    return {"smoothing": {"alpha": alpha, "norms": len(targets), "mlp": len(mlps),
                          "calibration": f"{tokens} random token ids in rows of 128, seed {seed}"}}


def _factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), scaled to geometric mean 1 so that overall
    magnitudes (and fp32 range) stay where they were."""
    s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return s / np.exp(np.log(s).mean())
