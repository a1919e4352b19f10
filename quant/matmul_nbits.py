"""The graph rewrite behind int8 and int4: weight MatMuls -> MatMulNBits, embedding -> GatherBlockQuantized.

Reference kernels: onnxruntime's `com.microsoft.MatMulNBits` and `com.microsoft.GatherBlockQuantized`
(docs/ContribOperators.md); packing in `blockwise.py`. The policy (which node gets how many bits,
symmetric or not, which accuracy level) belongs to the pass that calls `rewrite` (int8.py, int4.py).

Tied embeddings (one initializer read by the embedding Gather and, through a Transpose, by
lm_head/MatMul): when lm_head is quantized symmetrically with a block size dividing K, the Gather
reads the lm_head's own quantized bytes, so the table is stored once, as in the fp32 export. It
reads them in MatMulNBits' own [N, n_blocks, blob] layout (blocks along the last axis, each row's
blocks reshaped to [.., K] after the gather), not through a Reshape of the initializer: ONNX
Runtime constant-folds such a Reshape at load into a second copy of the table, held while the
session loads (bench/rss.py measures what it cost). The gathered rows are the same bits either way. Only the scales are stored twice
(MatMulNBits takes [N * n_blocks] or [N, n_blocks], the Gather of a 3-D table [N, n_blocks, 1]; a
float per block, 1/8 of the table's bytes at 8 bits), written next to the lm_head's own from the
same computation.

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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One weight's quantization, known by its layout before it is computed: the initializers are
    LazyTensors of these shapes and `deferred` computes the blockwise.Packed they hold when the
    folder is written."""
    deferred: common.Deferred
    bits: int
    block_size: int
    k: int
    n: int
    zero_points: np.dtype | None          # the dtype of the unpacked zero points; None: symmetric

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def blob(self) -> int:
        return self.block_size * self.bits // 8

    @property
    def shareable(self) -> bool:
        """Whether a tied embedding's GatherBlockQuantized can read these bytes: symmetric (the Gather
        takes no MatMulNBits zero points) and whole blocks along K."""
        return self.zero_points is None and self.k % self.block_size == 0

    def zero_points_shape(self) -> tuple[int, ...]:
        if self.bits == 8 or self.zero_points == np.float32:
            return (self.n * self.n_blocks,)
        return (self.n * -(-self.n_blocks // 2),)


@dataclasses.dataclass
class _Rewrite:
    """One rewrite's graph, fresh names and accuracy level."""
    graph: ir.Graph
    names: common.Names
    accuracy_level: int

    def initializer(self, compute, dtype: ir.DataType, shape: Sequence[int], base: str) -> ir.Value:
        return common.add_lazy(self.graph, compute, dtype=dtype, shape=shape, name=self.names(base))

    def matmul_nbits(self, x: ir.Value, plan: _Plan, *, weight: str, name: str,
                     output: ir.Value) -> tuple[ir.Node, dict[str, ir.Value]]:
        base = weight.replace("/", "_")
        d = plan.deferred
        b = self.initializer(d.part(lambda p: p.data), ir.DataType.UINT8, (plan.n, plan.n_blocks, plan.blob),
                             f"{base}_Q{plan.bits}")
        s = self.initializer(d.part(lambda p: p.scales.reshape(-1)), ir.DataType.FLOAT,
                             (plan.n * plan.n_blocks,), f"{base}_scales")
        inputs = [x, b, s]
        if plan.zero_points is not None:
            inputs.append(self.initializer(d.part(lambda p: p.zero_points_packed()),
                                           ir.DataType.from_numpy(np.dtype(plan.zero_points)),
                                           plan.zero_points_shape(), f"{base}_zero_points"))
        node = common.op("MatMulNBits", inputs, [output], name=name, domain=common.MS_DOMAIN,
                         K=plan.k, N=plan.n, bits=plan.bits, block_size=plan.block_size,
                         accuracy_level=self.accuracy_level)
        return node, {"data": b, "scales": s}

    def single(self, wm: common.WeightMatMul, plan: _Plan) -> dict[str, ir.Value]:
        out = common.output_like(wm.node.outputs[0])
        node, names = self.matmul_nbits(wm.node.inputs[0], plan, weight=wm.weight.name,
                                        name=common.renamed(wm.node, "MatMulNBits"), output=out)
        common.replace(self.graph, [wm.node], [node], [out])
        return names

    def tied(self, wm: common.WeightMatMul, plan: _Plan) -> dict[str, ir.Value]:
        """A tied lm_head's MatMulNBits and, when shareable, the scales an embedding Gather of its
        bytes needs ([N, n_blocks, 1]), registered right after the lm_head's own so that the folder
        writes them from one computation of the plan (dropped with the unused if no Gather reads them)."""
        names = self.single(wm, plan)
        if plan.shareable:
            n, nb = plan.n, plan.n_blocks
            names["gather_scales"] = self.initializer(plan.deferred.part(lambda p: p.scales.reshape(n, nb, 1)),
                                                      ir.DataType.FLOAT, (n, nb, 1), f"{names['scales'].name}_3d")
        return names

    def columns(self, wm: common.WeightMatMul, plans: Sequence[_Plan], labels: Sequence[str]) -> None:
        """One MatMulNBits per column range of `wm`'s weight, then Concat (last axis) into its output."""
        module = common.module_name(wm.node)
        parts = []
        for label, plan in zip(labels, plans):
            out = ir.Value(name=self.names(f"{module}/{label}/MatMulNBits_output_0"))
            node, _ = self.matmul_nbits(wm.node.inputs[0], plan, weight=f"{module}.{label}.weight",
                                        name=f"{module}/{label}/MatMulNBits", output=out)
            parts.append(node)
        out = common.output_like(wm.node.outputs[0])
        concat = common.op("Concat", [n.outputs[0] for n in parts], [out], name=f"{module}/Concat", axis=-1)
        common.replace(self.graph, [wm.node], [*parts, concat], [out])

    def stacked(self, wms: Sequence[common.WeightMatMul], plans: Sequence[_Plan]) -> None:
        """MatMulNBits over the stacked weights, then Split (last axis) into the siblings' outputs.
        It goes where the first sibling was: all siblings read the same input, and every reader of
        any sibling's output comes after that point."""
        mods = [common.module_name(wm.node) for wm in wms]
        parent = mods[0].rsplit(".", 1)[0] if "." in mods[0] else ""
        module = (parent + "." if parent else "") + "+".join(m.rsplit(".", 1)[-1] for m in mods)
        stacked = ir.Value(name=self.names(f"{module}/MatMulNBits_output_0"))
        node, _ = self.matmul_nbits(wms[0].node.inputs[0], _stack(plans), weight=f"{module}.weight",
                                    name=f"{module}/MatMulNBits", output=stacked)
        sizes = self.names(f"{module}/split_sizes")
        size_node = common.constant(sizes, np.array([p.n for p in plans], np.int64), name=f"{module}/Constant_split")
        outs = [common.output_like(wm.node.outputs[0]) for wm in wms]
        split = common.op("Split", [stacked, size_node.outputs[0]], outs, name=f"{module}/Split", axis=-1)
        common.replace(self.graph, [wm.node for wm in wms], [node, size_node, split], outs)

    def gather_shared(self, node: ir.Node, names: dict[str, ir.Value], plan: _Plan) -> bool:
        """GatherBlockQuantized over the lm_head's MatMulNBits bytes as they are ([N, nb, blob],
        blocks along the last axis), its output [.., nb, block] reshaped to [.., K]; False when the
        ids' rank is unknown (the reshape needs it)."""
        ids = node.inputs[1]
        if ids.shape is None:
            return False
        mod = common.module_name(node)
        blocks = ir.Value(name=self.names(f"{mod}/GatherBlockQuantized_output_0"))
        gather = common.op("GatherBlockQuantized", [names["data"], ids, names["gather_scales"]], [blocks],
                           name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                           bits=plan.bits, block_size=plan.block_size, quantize_axis=2, gather_axis=0)
        # The shape as a Constant node, not an initializer: the folder stores every initializer
        # externally and shape inference cannot read a Reshape's shape from external data.
        shape = common.constant(self.names(f"{mod}/rows_shape"), np.array([0] * len(ids.shape) + [plan.k], np.int64),
                                name=f"{mod}/Constant_rows_shape")
        out = common.output_like(node.outputs[0])
        rows = common.op("Reshape", [blocks, shape.outputs[0]], [out], name=f"{mod}/Reshape_rows")
        common.replace(self.graph, [node], [gather, shape, rows], [out])
        return True

    def gather_own(self, node: ir.Node, block_size: int) -> bool:
        """An int8 symmetric copy of the table [V, H], blocked along H; False when H is not a block multiple."""
        tensor = node.inputs[0].const_value
        v, h = (int(d) for d in tensor.shape)
        if h % block_size:
            return False
        # W = table.T [H, V]: its columns are the table's rows, read a chunk at a time
        table = common.tensor_columns(tensor, transposed=True)
        deferred = common.Deferred(lambda: blockwise.quantize(table, bits=8, block_size=block_size, symmetric=True))
        base = node.inputs[0].name.replace("/", "_")
        d = self.initializer(deferred.part(lambda p: p.data.reshape(v, h)), ir.DataType.UINT8, (v, h), f"{base}_Q8")
        s = self.initializer(deferred.part(lambda p: p.scales), ir.DataType.FLOAT, (v, h // block_size),
                             f"{base}_scales")
        out = common.output_like(node.outputs[0])
        gather = common.op("GatherBlockQuantized", [d, node.inputs[1], s], [out],
                           name=common.renamed(node, "GatherBlockQuantized"), domain=common.MS_DOMAIN,
                           bits=8, block_size=block_size, quantize_axis=1, gather_axis=0)
        common.replace(self.graph, [node], [gather], [out])
        return True


def _plan(weight: common.Columns, k: int, n: int, c: Choice, block_size: int) -> _Plan:
    block = c.block_size or block_size
    zp = None if c.symmetric else np.dtype(np.float32 if c.float_zero_points else np.uint8)
    return _Plan(common.Deferred(lambda: blockwise.quantize(
        weight, bits=c.bits, block_size=block, symmetric=c.symmetric, search=c.search,
        float_zero_points=c.float_zero_points)), bits=c.bits, block_size=block, k=k, n=n, zero_points=zp)


def _stack(plans: Sequence[_Plan]) -> _Plan:
    """One plan for weights concatenated along N (every row is quantized on its own)."""
    def stacked() -> blockwise.Packed:
        packs = [p.deferred.compute() for p in plans]
        first, zps = packs[0], [p.zero_points for p in packs]
        return blockwise.Packed(
            data=np.concatenate([p.data for p in packs]), scales=np.concatenate([p.scales for p in packs]),
            zero_points=None if zps[0] is None else np.concatenate(zps), bits=first.bits,
            block_size=first.block_size, k=first.k)
    first = plans[0]
    return dataclasses.replace(first, deferred=common.Deferred(stacked), n=sum(p.n for p in plans))


def rewrite(model: ir.Model, *, choose: Callable[[common.WeightMatMul], Choice | Columns], block_size: int,
            accuracy_level: int, exclude: Sequence[str] = ()) -> Stats:
    """Rewrite `model` in place; `choose` gives each weight MatMul's bits and scale rule. Nothing is
    quantized here: each weight is, when the model is written (see common.py, streaming)."""
    graph = model.graph
    edit = _Rewrite(graph, common.Names(graph), accuracy_level)
    stats = Stats()
    tied: dict[str, tuple[_Plan, dict[str, ir.Value]]] = {}   # weight name (transposed) -> plan
    groups: dict[tuple[str, Choice], list[tuple[common.WeightMatMul, _Plan]]] = {}
    for wm in common.weight_matmuls(graph, exclude=exclude):
        c = choose(wm)
        shape = [int(d) for d in wm.weight.const_value.shape]
        k, n = shape[::-1] if wm.transposed else shape
        weight = common.weight_columns(wm)
        if isinstance(c, Columns):
            start, plans = 0, []
            for label, width, part in c.parts:
                plans.append(_plan(weight.sub(start, width), k, width, part, block_size))
                stats.matmuls[f"{common.module_name(wm.node)}[{label}]"] = part.bits
                start += width
            edit.columns(wm, plans, [label for label, _, _ in c.parts])
            continue
        plan = _plan(weight, k, n, c, block_size)
        stats.matmuls[common.module_name(wm.node)] = c.bits
        if wm.transposed:
            # A tied lm_head: its bytes are shared with the embedding below, so it stays its own node.
            tied[wm.weight.name] = (plan, edit.tied(wm, plan))
        else:
            groups.setdefault((wm.node.inputs[0].name, c), []).append((wm, plan))
    for members in groups.values():
        if len(members) == 1:
            edit.single(*members[0])
        else:
            edit.stacked([m[0] for m in members], [m[1] for m in members])
    stats.excluded = [common.module_name(n) for n in graph if common.is_op(n, "MatMul") and common.excluded(n, exclude)]
    for node in common.embedding_gathers(graph, exclude=exclude):
        shared = tied.get(node.inputs[0].name)
        if shared is not None and shared[0].shareable and edit.gather_shared(node, shared[1], shared[0]):
            stats.embedding = f"shared with lm_head (int{shared[0].bits})"
        elif edit.gather_own(node, block_size):
            stats.embedding = "int8"
    common.drop_unused(graph)
    common.ensure_opset(model, common.MS_DOMAIN, 1)
    return stats

