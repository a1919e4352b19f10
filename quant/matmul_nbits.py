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
import onnx_ir as ir

from edgellama.quant import blockwise, common


@dataclasses.dataclass(frozen=True)
class Choice:
    """How one weight MatMul is quantized."""
    bits: int
    symmetric: bool
    search: bool
    float_zero_points: bool = False
    block_size: int | None = None          # None: the pass's block size


@dataclasses.dataclass(frozen=True)
class Columns:
    """One weight whose column ranges (along N) are quantized by different Choices: the static
    contract's packed q|k|v MatMul, whose v columns a pass may keep at 8 bits. Each range becomes
    its own MatMulNBits, concatenated back along the last axis."""
    parts: tuple[tuple[str, int, Choice], ...]      # (label, width, choice), in column order


@dataclasses.dataclass
class Stats:
    matmuls: dict[str, int] = dataclasses.field(default_factory=dict)   # module -> bits
    embedding: str | None = None                                       # "shared-with-lm_head" | "int8" | None
    excluded: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Rewrite:
    """One rewrite's graph, fresh names and accuracy level."""
    graph: ir.Graph
    names: common.Names
    accuracy_level: int

    def initializer(self, value: np.ndarray, base: str) -> ir.Value:
        return common.add_initializer(self.graph, value, self.names(base))

    def matmul_nbits(self, x: ir.Value, packed: blockwise.Packed, *, weight: str, name: str,
                     output: ir.Value) -> tuple[ir.Node, dict[str, ir.Value]]:
        base = weight.replace("/", "_")
        b = self.initializer(packed.data, f"{base}_Q{packed.bits}")
        s = self.initializer(packed.scales.reshape(-1), f"{base}_scales")
        inputs = [x, b, s]
        zp = packed.zero_points_packed()
        if zp is not None:
            inputs.append(self.initializer(zp, f"{base}_zero_points"))
        node = common.op("MatMulNBits", inputs, [output], name=name, domain=common.MS_DOMAIN,
                         K=packed.k, N=packed.n, bits=packed.bits, block_size=packed.block_size,
                         accuracy_level=self.accuracy_level)
        return node, {"data": b, "scales": s}

    def single(self, wm: common.WeightMatMul, packed: blockwise.Packed) -> dict[str, ir.Value]:
        out = common.output_like(wm.node.outputs[0])
        node, names = self.matmul_nbits(wm.node.inputs[0], packed, weight=wm.weight.name,
                                        name=common.renamed(wm.node, "MatMulNBits"), output=out)
        common.replace(self.graph, [wm.node], [node], [out])
        return names

    def columns(self, wm: common.WeightMatMul, packs: Sequence[blockwise.Packed], labels: Sequence[str]) -> None:
        """One MatMulNBits per column range of `wm`'s weight, then Concat (last axis) into its output."""
        module = common.module_name(wm.node)
        parts = []
        for label, packed in zip(labels, packs):
            out = ir.Value(name=self.names(f"{module}/{label}/MatMulNBits_output_0"))
            node, _ = self.matmul_nbits(wm.node.inputs[0], packed, weight=f"{module}.{label}.weight",
                                        name=f"{module}/{label}/MatMulNBits", output=out)
            parts.append(node)
        out = common.output_like(wm.node.outputs[0])
        concat = common.op("Concat", [n.outputs[0] for n in parts], [out], name=f"{module}/Concat", axis=-1)
        common.replace(self.graph, [wm.node], [*parts, concat], [out])

    def stacked(self, wms: Sequence[common.WeightMatMul], packs: Sequence[blockwise.Packed]) -> None:
        """MatMulNBits over the stacked weights, then Split (last axis) into the siblings' outputs.
        It goes where the first sibling was: all siblings read the same input, and every reader of
        any sibling's output comes after that point."""
        mods = [common.module_name(wm.node) for wm in wms]
        parent = mods[0].rsplit(".", 1)[0] if "." in mods[0] else ""
        module = (parent + "." if parent else "") + "+".join(m.rsplit(".", 1)[-1] for m in mods)
        stacked = ir.Value(name=self.names(f"{module}/MatMulNBits_output_0"))
        node, _ = self.matmul_nbits(wms[0].node.inputs[0], _stack(packs), weight=f"{module}.weight",
                                    name=f"{module}/MatMulNBits", output=stacked)
        sizes = self.names(f"{module}/split_sizes")
        size_node = common.constant(sizes, np.array([p.n for p in packs], np.int64), name=f"{module}/Constant_split")
        outs = [common.output_like(wm.node.outputs[0]) for wm in wms]
        split = common.op("Split", [stacked, size_node.outputs[0]], outs, name=f"{module}/Split", axis=-1)
        common.replace(self.graph, [wm.node for wm in wms], [node, size_node, split], outs)

    def gather_shared(self, node: ir.Node, names: dict[str, ir.Value], packed: blockwise.Packed) -> None:
        """GatherBlockQuantized over the lm_head's MatMulNBits bytes: [N, nb, blob] -> [N, K*bits/8]."""
        n, nb = packed.n, packed.n_blocks
        mod = common.module_name(node)
        data2d, scales2d = f"{names['data'].name}_2d", f"{names['scales'].name}_2d"
        # Shapes as Constant nodes, not initializers: the folder stores every initializer externally
        # and shape inference cannot read a Reshape's shape from external data.
        shape_d = common.constant(f"{data2d}_shape", np.array([n, nb * packed.data.shape[2]], np.int64),
                                  name=f"{mod}/Constant_data_shape")
        shape_s = common.constant(f"{scales2d}_shape", np.array([n, nb], np.int64), name=f"{mod}/Constant_scales_shape")
        reshape_d = common.op("Reshape", [names["data"], shape_d.outputs[0]], [data2d], name=f"{mod}/Reshape_data")
        reshape_s = common.op("Reshape", [names["scales"], shape_s.outputs[0]], [scales2d], name=f"{mod}/Reshape_scales")
        out = common.output_like(node.outputs[0])
        gather = common.op("GatherBlockQuantized", [reshape_d.outputs[0], node.inputs[1], reshape_s.outputs[0]], [out],
                           name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                           bits=packed.bits, block_size=packed.block_size, quantize_axis=1, gather_axis=0)
        common.replace(self.graph, [node], [shape_d, shape_s, reshape_d, reshape_s, gather], [out])

    def gather_own(self, node: ir.Node, block_size: int) -> bool:
        """An int8 symmetric copy of the table [V, H], blocked along H; False when H is not a block multiple."""
        table = common.array(node.inputs[0])
        v, h = table.shape
        if h % block_size:
            return False
        packed = blockwise.quantize(table.T, bits=8, block_size=block_size, symmetric=True)
        base = node.inputs[0].name.replace("/", "_")
        d = self.initializer(packed.data.reshape(v, h), f"{base}_Q8")
        s = self.initializer(packed.scales, f"{base}_scales")
        out = common.output_like(node.outputs[0])
        gather = common.op("GatherBlockQuantized", [d, node.inputs[1], s], [out],
                           name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                           bits=8, block_size=block_size, quantize_axis=1, gather_axis=0)
        common.replace(self.graph, [node], [gather], [out])
        return True


def _quantize(w: np.ndarray, c: Choice, block_size: int) -> blockwise.Packed:
    return blockwise.quantize(np.ascontiguousarray(w), bits=c.bits, block_size=c.block_size or block_size,
                              symmetric=c.symmetric, search=c.search, float_zero_points=c.float_zero_points)


def _stack(packs: Sequence[blockwise.Packed]) -> blockwise.Packed:
    """One Packed for weights concatenated along N (every row is quantized on its own)."""
    first = packs[0]
    zps = [p.zero_points for p in packs]
    return blockwise.Packed(
        data=np.concatenate([p.data for p in packs]), scales=np.concatenate([p.scales for p in packs]),
        zero_points=None if zps[0] is None else np.concatenate(zps), bits=first.bits,
        block_size=first.block_size, k=first.k)


def rewrite(model: ir.Model, *, choose: Callable[[common.WeightMatMul], Choice | Columns], block_size: int,
            accuracy_level: int, exclude: Sequence[str] = ()) -> Stats:
    """Rewrite `model` in place; `choose` gives each weight MatMul's bits and scale rule."""
    graph = model.graph
    edit = _Rewrite(graph, common.Names(graph), accuracy_level)
    stats = Stats()
    tied: dict[str, tuple[blockwise.Packed, dict[str, ir.Value]]] = {}   # weight name (transposed) -> packed
    groups: dict[tuple[str, Choice], list[tuple[common.WeightMatMul, blockwise.Packed]]] = {}
    for wm in common.weight_matmuls(graph, exclude=exclude):
        c = choose(wm)
        if isinstance(c, Columns):
            w, start, packs = common.weight_array(wm), 0, []
            for label, width, part in c.parts:
                packs.append(_quantize(w[:, start:start + width], part, block_size))
                stats.matmuls[f"{common.module_name(wm.node)}[{label}]"] = part.bits
                start += width
            edit.columns(wm, packs, [label for label, _, _ in c.parts])
            continue
        packed = _quantize(common.weight_array(wm), c, block_size)
        stats.matmuls[common.module_name(wm.node)] = c.bits
        if wm.transposed:
            # A tied lm_head: its bytes are shared with the embedding below, so it stays its own node.
            tied[wm.weight.name] = (packed, edit.single(wm, packed))
        else:
            groups.setdefault((wm.node.inputs[0].name, c), []).append((wm, packed))
    for members in groups.values():
        if len(members) == 1:
            edit.single(*members[0])
        else:
            edit.stacked([m[0] for m in members], [m[1] for m in members])
    stats.excluded = [common.module_name(n) for n in graph if common.is_op(n, "MatMul") and common.excluded(n, exclude)]
    for node in common.embedding_gathers(graph, exclude=exclude):
        shared = tied.get(node.inputs[0].name)
        if shared is not None and shared[0].zero_points is None and shared[0].k % shared[0].block_size == 0:
            edit.gather_shared(node, shared[1], shared[0])
            stats.embedding = f"shared with lm_head (int{shared[0].bits})"
        elif edit.gather_own(node, block_size):
            stats.embedding = "int8"
    common.drop_unused(graph)
    common.ensure_opset(model, common.MS_DOMAIN, 1)
    return stats
