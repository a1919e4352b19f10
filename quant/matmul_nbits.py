"""The graph rewrite behind int8 and int4: weight MatMuls -> MatMulNBits, embedding -> GatherBlockQuantized.

Reference kernels: onnxruntime's `com.microsoft.MatMulNBits` and `com.microsoft.GatherBlockQuantized`
(docs/ContribOperators.md); packing in `blockwise.py`. The policy (which node gets how many bits,
symmetric or not, which accuracy level) belongs to the pass that calls `rewrite` (int8.py, int4.py).

Tied embeddings (one initializer read by the embedding Gather and, through a Transpose, by
lm_head/MatMul): when lm_head is quantized symmetrically with a block size dividing K, the Gather
reads the lm_head's own quantized bytes (a Reshape, which ONNX Runtime folds at load), so the
table is stored once, as in the fp32 export.

Sibling MatMuls (the same input, the same Choice: q/k/v, gate/up) become ONE MatMulNBits over
their weights stacked along N, then a Split back to the original outputs. Per-column
quantization makes the stacking exact (each output column keeps its own blocks, scales and zero
points); what it saves is per-node work that does not scale with N: with accuracy_level 4 each
MatMulNBits quantizes its input activations again, and each node is one more thread-pool
dispatch per token. onnxruntime-genai's builder packs the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from edgellama.quant import blockwise, common


@dataclasses.dataclass(frozen=True)
class Choice:
    """How one weight MatMul is quantized."""
    bits: int
    symmetric: bool
    search: bool
    float_zero_points: bool = False
    block_size: int | None = None          # None: the pass's block size


@dataclasses.dataclass
class Stats:
    matmuls: dict[str, int] = dataclasses.field(default_factory=dict)   # module -> bits
    embedding: str | None = None                                       # "shared-with-lm_head" | "int8" | None
    excluded: list[str] = dataclasses.field(default_factory=list)


def _matmul_nbits(graph: onnx.GraphProto, wm: common.WeightMatMul, packed: blockwise.Packed, *,
                  accuracy_level: int) -> tuple[onnx.NodeProto, dict[str, str]]:
    base = wm.weight.replace("/", "_")
    b = common.add_initializer(graph, packed.data, common.unique_name(graph, f"{base}_Q{packed.bits}"))
    s = common.add_initializer(graph, packed.scales.reshape(-1), common.unique_name(graph, f"{base}_scales"))
    inputs = [wm.node.input[0], b, s]
    zp = packed.zero_points_packed()
    if zp is not None:
        inputs.append(common.add_initializer(graph, zp, common.unique_name(graph, f"{base}_zero_points")))
    node = helper.make_node(
        "MatMulNBits", inputs, list(wm.node.output), name=common.renamed(wm.node, "MatMulNBits"),
        domain=common.MS_DOMAIN, K=packed.k, N=packed.n, bits=packed.bits, block_size=packed.block_size,
        accuracy_level=accuracy_level)
    return node, {"data": b, "scales": s}


# Stack sibling MatMuls into one MatMulNBits (see the module docstring); False keeps one node each.
PACK_SIBLINGS = True


def _stack(packs: Sequence[blockwise.Packed]) -> blockwise.Packed:
    """One Packed for weights concatenated along N (every row is quantized on its own)."""
    first = packs[0]
    zps = [p.zero_points for p in packs]
    return blockwise.Packed(
        data=np.concatenate([p.data for p in packs]), scales=np.concatenate([p.scales for p in packs]),
        zero_points=None if zps[0] is None else np.concatenate(zps), bits=first.bits,
        block_size=first.block_size, k=first.k)


def _packed_matmul(graph: onnx.GraphProto, wms: Sequence[common.WeightMatMul], packs: Sequence[blockwise.Packed],
                   *, accuracy_level: int) -> list[onnx.NodeProto]:
    """MatMulNBits over the stacked weights, then Split (last axis) into the siblings' outputs."""
    mods = [common.module_name(wm.node) for wm in wms]
    parent = mods[0].rsplit(".", 1)[0] if "." in mods[0] else ""
    module = (parent + "." if parent else "") + "+".join(m.rsplit(".", 1)[-1] for m in mods)
    merged = _stack(packs)
    stacked = common.unique_name(graph, f"{module}/MatMulNBits_output_0")
    first = common.WeightMatMul(helper.make_node("MatMul", [wms[0].node.input[0], wms[0].weight], [stacked],
                                                 name=f"{module}/MatMul"), f"{module}.weight", False)
    node, _ = _matmul_nbits(graph, first, merged, accuracy_level=accuracy_level)
    sizes = common.unique_name(graph, f"{module}/split_sizes")
    return [node,
            common.constant(sizes, np.array([p.n for p in packs], np.int64), name=f"{module}/Constant_split"),
            helper.make_node("Split", [stacked, sizes], [wm.node.output[0] for wm in wms],
                             name=f"{module}/Split", axis=-1)]


def _gather_shared(graph: onnx.GraphProto, node: onnx.NodeProto, names: dict[str, str],
                   packed: blockwise.Packed) -> list[onnx.NodeProto]:
    """GatherBlockQuantized over the lm_head's MatMulNBits bytes: [N, nb, blob] -> [N, K*bits/8]."""
    n, nb = packed.n, packed.n_blocks
    mod = common.module_name(node)
    data2d, scales2d = f"{names['data']}_2d", f"{names['scales']}_2d"
    # Shapes as Constant nodes, not initializers: the folder stores every initializer externally
    # and shape inference cannot read a Reshape's shape from external data.
    shape_d, shape_s = f"{data2d}_shape", f"{scales2d}_shape"
    return [
        common.constant(shape_d, np.array([n, nb * packed.data.shape[2]], np.int64), name=f"{mod}/Constant_data_shape"),
        common.constant(shape_s, np.array([n, nb], np.int64), name=f"{mod}/Constant_scales_shape"),
        helper.make_node("Reshape", [names["data"], shape_d], [data2d], name=f"{mod}/Reshape_data"),
        helper.make_node("Reshape", [names["scales"], shape_s], [scales2d], name=f"{mod}/Reshape_scales"),
        helper.make_node("GatherBlockQuantized", [data2d, node.input[1], scales2d], list(node.output),
                         name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                         bits=packed.bits, block_size=packed.block_size, quantize_axis=1, gather_axis=0),
    ]


def _gather_own(graph: onnx.GraphProto, node: onnx.NodeProto, table: np.ndarray,
                block_size: int) -> list[onnx.NodeProto] | None:
    """An int8 symmetric copy of the table [V, H], blocked along H; None when H is not a block multiple."""
    v, h = table.shape
    if h % block_size:
        return None
    packed = blockwise.quantize(table.T, bits=8, block_size=block_size, symmetric=True)
    base = node.input[0].replace("/", "_")
    d = common.add_initializer(graph, packed.data.reshape(v, h), common.unique_name(graph, f"{base}_Q8"))
    s = common.add_initializer(graph, packed.scales, common.unique_name(graph, f"{base}_scales"))
    return [helper.make_node("GatherBlockQuantized", [d, node.input[1], s], list(node.output),
                             name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                             bits=8, block_size=block_size, quantize_axis=1, gather_axis=0)]


def rewrite(model: onnx.ModelProto, *, choose: Callable[[common.WeightMatMul], Choice], block_size: int,
            accuracy_level: int, exclude: Sequence[str] = (), quantize_embedding: bool = True) -> Stats:
    """Rewrite `model` in place; `choose` gives each weight MatMul's bits and scale rule."""
    graph = model.graph
    stats = Stats()
    replacements: dict[str, list[onnx.NodeProto]] = {}
    quantized: dict[str, tuple[blockwise.Packed, dict[str, str]]] = {}   # weight name (transposed) -> packed
    groups: dict[tuple[str, Choice], list[tuple[common.WeightMatMul, blockwise.Packed]]] = {}
    for wm in common.weight_matmuls(graph, exclude=exclude):
        c = choose(wm)
        packed = blockwise.quantize(common.weight_array(graph, wm), bits=c.bits, block_size=c.block_size or block_size,
                                    symmetric=c.symmetric, search=c.search,
                                    float_zero_points=c.float_zero_points)
        stats.matmuls[common.module_name(wm.node)] = c.bits
        if wm.transposed:
            # A tied lm_head: its bytes are shared with the embedding below, so it stays its own node.
            node, names = _matmul_nbits(graph, wm, packed, accuracy_level=accuracy_level)
            replacements[wm.node.output[0]] = [node]
            quantized[wm.weight] = (packed, names)
        else:
            key = (wm.node.input[0] if PACK_SIBLINGS else wm.node.output[0], c)
            groups.setdefault(key, []).append((wm, packed))
    for members in groups.values():
        if len(members) == 1:
            wm, packed = members[0]
            replacements[wm.node.output[0]] = [_matmul_nbits(graph, wm, packed, accuracy_level=accuracy_level)[0]]
            continue
        wms, packs = [m[0] for m in members], [m[1] for m in members]
        # The stacked node goes where the first sibling was: all siblings read the same input, and
        # every reader of any sibling's output comes after that point.
        replacements[wms[0].node.output[0]] = _packed_matmul(graph, wms, packs, accuracy_level=accuracy_level)
        for wm in wms[1:]:
            replacements[wm.node.output[0]] = []
    stats.excluded = [common.module_name(n) for n in graph.node
                      if n.op_type == "MatMul" and common.excluded(n, exclude)]
    if quantize_embedding:
        inits = common.initializers(graph)
        for node in common.embedding_gathers(graph, exclude=exclude):
            shared = quantized.get(node.input[0])
            if shared is not None and shared[0].zero_points is None and shared[0].k % shared[0].block_size == 0:
                replacements[node.output[0]] = _gather_shared(graph, node, shared[1], shared[0])
                stats.embedding = f"shared with lm_head (int{shared[0].bits})"
                continue
            own = _gather_own(graph, node, onnx.numpy_helper.to_array(inits[node.input[0]]), block_size)
            if own is not None:
                replacements[node.output[0]] = own
                stats.embedding = "int8"
    common.replace_nodes(graph, replacements)
    common.drop_unused_initializers(graph)
    common.ensure_opset(model, common.MS_DOMAIN, 1)
    return stats
