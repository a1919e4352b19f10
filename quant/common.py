"""What every quantization pass shares: finding the weights and the graph edits, on onnx_ir.

Passes work on an `onnx_ir.Model`, the representation export builds: `export --quant` hands its
model over in memory, `quantize_folder` reads a folder's model with its weights left lazy in
model.onnx.data. Weights go through numpy (`array` in, `add_initializer` / `set_array` out).

Streaming: a pass never holds every weight. What it writes is a LazyTensor (`add_lazy`,
`set_lazy`) computed from the source tensor when the folder is written, one weight at a time;
several initializers computed together (a weight's codes, scales and zero points) share one
`Deferred`, computed once for all of them. `array` copies an external tensor out of its file and
closes the mapping, so reading weights one by one never leaves them all mapped.

Large weights (an 8B model's lm_head and embedding: 525M parameters, 2.1 GB in float32) are also
read in parts: `part` reads the rows or columns of a tensor at an index without the rest, and the
lazy tensors the passes build (`lazy(..., part=)`: widened fp16, smoothed) compute a part from
their source's same part, so a pass working along N (output columns, `column_chunks`) holds one
chunk of a weight at a time, not the weight.

A *weight MatMul* is a standard `MatMul` whose second input is a 2-D float initializer `W [K, N]`
(the exporter stores `nn.Linear` weights transposed, in x out) or a `Transpose(perm=[1, 0])` of
one. Activations stay as they are; only these nodes (and the embedding `Gather`) are rewritten.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
from typing import Callable, Sequence, Union

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
# The float32 bytes of one chunk of a weight processed along N (tests lower it to force many chunks).
CHUNK_BYTES = 32 << 20
Index = Union[slice, np.ndarray]
# An external tensor's file mapping is opened, copied from and closed by one thread at a time
# (blockwise.py quantizes chunks on two threads; `release` under another's read would unmap it).
_READ_LOCK = threading.RLock()


def is_op(node: ir.Node, op_type: str) -> bool:
    """A node of the standard ONNX domain."""
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


# -- finding weights ------------------------------------------------------------------------------
@dataclasses.dataclass
class WeightMatMul:
    node: ir.Node
    weight: ir.Value       # the initializer
    transposed: bool       # the MatMul reads Transpose(weight): W = weight.T


def module_name(node: ir.Node) -> str:
    """`model.layers.3.mlp.down_proj` for the node `model.layers.3.mlp.down_proj/MatMul`."""
    name = node.name or ""
    return name.rsplit("/", 1)[0] if "/" in name else name


def excluded(node: ir.Node, patterns: Sequence[str]) -> bool:
    """True when a pattern (fnmatch) matches the node name, its module path or a module prefix:
    `lm_head`, `model.layers.0.*` and `*.down_proj` all work."""
    mod = module_name(node)
    prefixes = [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in (node.name or "", mod, *prefixes))


def is_float_initializer(value: ir.Value | None, *, rank: int | None = None) -> bool:
    if value is None or not value.is_initializer() or value.const_value is None:
        return False
    t = value.const_value
    return t.dtype == ir.DataType.FLOAT and (rank is None or len(t.shape) == rank)


def weight_matmuls(graph: ir.Graph, *, exclude: Sequence[str] = ()) -> list[WeightMatMul]:
    """Every MatMul with a constant 2-D float weight, in graph order, minus the excluded ones."""
    found = []
    for node in graph:
        if not is_op(node, "MatMul") or excluded(node, exclude):
            continue
        weight, transposed = node.inputs[1], False
        prod = weight.producer() if weight is not None else None
        if not weight.is_initializer() and prod is not None and is_op(prod, "Transpose"):
            perm = prod.attributes.get("perm")
            if (list(perm.as_ints()) if perm is not None else [1, 0]) == [1, 0] and prod.inputs[0].is_initializer():
                weight, transposed = prod.inputs[0], True
        if is_float_initializer(weight, rank=2):
            found.append(WeightMatMul(node, weight, transposed))
    return found


def embedding_gathers(graph: ir.Graph, *, exclude: Sequence[str] = ()) -> list[ir.Node]:
    """Gather nodes reading rows (axis 0) of a 2-D float initializer: the token embedding."""
    out = []
    for node in graph:
        if not is_op(node, "Gather") or excluded(node, exclude):
            continue
        axis = node.attributes.get("axis")
        if (axis.as_int() if axis is not None else 0) == 0 and is_float_initializer(node.inputs[0], rank=2):
            out.append(node)
    return out


def read(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values; an external tensor's are copied out and its file mapping closed."""
    if isinstance(tensor, ir.ExternalTensor):
        with _READ_LOCK:
            values = np.array(tensor.numpy())
            tensor.release()
        return values
    return tensor.numpy()


def part(tensor: ir.TensorProtocol, axis: int, index: Index) -> np.ndarray:
    """`tensor`'s values at `index` (a slice or integer array) along `axis`, without reading the
    rest where the tensor allows it: an external tensor copies only those rows/columns out of its
    mapping (then closes it), a lazy tensor built with `part=` computes only them."""
    compute = getattr(tensor, "edgellama_part", None)
    if compute is not None:
        return compute(axis, index)
    at = (slice(None),) * axis + (index,)
    if isinstance(tensor, ir.ExternalTensor):
        with _READ_LOCK:
            values = np.array(tensor.numpy()[at])
            tensor.release()
        return values
    return np.array(tensor.numpy()[at])


def column_chunks(k: int, n: int, *, budget: int | None = None) -> list[slice]:
    """Slices of N such that one chunk of a [K, N] float32 weight is about `budget` bytes
    (CHUNK_BYTES by default; at least one column)."""
    width = max(1, (CHUNK_BYTES if budget is None else budget) // max(1, 4 * k))
    return [slice(a, min(a + width, n)) for a in range(0, n, width)]


def array(value: ir.Value) -> np.ndarray:
    return read(value.const_value)


def weight_reader(wm: WeightMatMul) -> Callable[[], np.ndarray]:
    """W as the MatMul uses it, [K, N] float32, read when called (from the tensor the weight holds now)."""
    tensor, transposed = wm.weight.const_value, wm.transposed

    def weight() -> np.ndarray:
        w = read(tensor)
        return np.ascontiguousarray(w.T if transposed else w, dtype=np.float32)
    return weight


@dataclasses.dataclass(frozen=True)
class Columns:
    """W [K, N] float32 read by column ranges: `read(a, b)` is W[:, a:b]."""
    k: int
    n: int
    read: Callable[[int, int], np.ndarray]

    def whole(self) -> np.ndarray:
        return self.read(0, self.n)

    def sub(self, start: int, width: int) -> "Columns":
        return Columns(self.k, width, lambda a, b: self.read(start + a, start + b))


def tensor_columns(tensor: ir.TensorProtocol, *, transposed: bool) -> Columns:
    """The [K, N] float32 weight stored in `tensor` as [K, N] (or as [N, K] when `transposed`),
    read by column ranges (rows of the stored tensor when transposed)."""
    rows, cols = (int(d) for d in tensor.shape)
    if transposed:
        return Columns(cols, rows, lambda a, b: np.ascontiguousarray(part(tensor, 0, slice(a, b)).T, dtype=np.float32))
    return Columns(rows, cols, lambda a, b: np.ascontiguousarray(part(tensor, 1, slice(a, b)), dtype=np.float32))


def weight_columns(wm: WeightMatMul) -> Columns:
    """W as the MatMul uses it, [K, N] float32, read by column ranges when called."""
    return tensor_columns(wm.weight.const_value, transposed=wm.transposed)


def weight_array(wm: WeightMatMul) -> np.ndarray:
    """W as the MatMul uses it: [K, N] float32."""
    return weight_reader(wm)()


class Deferred:
    """A computation whose results several lazy initializers hold (a weight's codes, scales, zero
    points). Computed when the first of them is written and kept while the next ones are: one
    Deferred holds its result at a time, so writing the folder holds one weight's results."""

    _held: "Deferred | None" = None

    def __init__(self, compute: Callable[[], object]):
        self.compute = compute
        self._result: object = None

    def get(self) -> object:
        if Deferred._held is not self:
            if Deferred._held is not None:
                Deferred._held._result = None
            self._result = self.compute()
            Deferred._held = self
        return self._result

    def part(self, pick: Callable[[object], np.ndarray]) -> Callable[[], np.ndarray]:
        return lambda: pick(self.get())


# -- editing ------------------------------------------------------------------------------------
class Names:
    """Fresh value names for one pass over a graph (every name taken is remembered)."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for v in graph.inputs} | set(graph.initializers) | \
            {o.name for n in graph for o in n.outputs}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def renamed(node: ir.Node, op_type: str) -> str:
    """Keep the module path in the name (parity localizes blocks by it), change the op suffix."""
    return f"{module_name(node)}/{op_type}" if node.name else ""


def op(op_type: str, inputs: Sequence[ir.Value | None], outputs: Sequence[str | ir.Value], *, name: str,
       domain: str = "", **attributes) -> ir.Node:
    """A node writing values of the given names (or the given Values)."""
    values = [o if isinstance(o, ir.Value) else ir.Value(name=o) for o in outputs]
    return ir.node(op_type, inputs, attributes, domain=domain, outputs=values, name=name)


def constant(output: str, value: np.ndarray, *, name: str) -> ir.Node:
    """A Constant node (kept inline in model.onnx, where shape inference can read it)."""
    return op("Constant", [], [output], name=name, value=ir.tensor(value, name=output))


def add_initializer(graph: ir.Graph, value: np.ndarray, name: str) -> ir.Value:
    value = np.asarray(value, order="C")   # ascontiguousarray would make a scalar 1-D
    v = ir.Value(name=name, shape=ir.Shape(value.shape), type=ir.TensorType(ir.DataType.from_numpy(value.dtype)),
                 const_value=ir.tensor(value, name=name))
    graph.register_initializer(v)
    return v


def set_array(value: ir.Value, new: np.ndarray) -> None:
    value.const_value = ir.tensor(np.asarray(new, order="C"), name=value.name)


class _PartLazyTensor(ir.LazyTensor):
    """A LazyTensor that can also compute a part of itself (`part`)."""

    edgellama_part: Callable[[int, Index], np.ndarray]


def lazy(compute: Callable[[], np.ndarray] | None, *, dtype: ir.DataType, shape: Sequence[int], name: str,
         part: Callable[[int, Index], np.ndarray] | None = None) -> ir.LazyTensor:
    """A tensor computed when it is read (written), checked against the dtype and shape it promised.
    With `part(axis, index)` (its values at `index` along `axis`) the tensor can be read in parts
    (common.part); `compute` None then means assembled from parts along axis 0, a chunk at a time."""
    want = tuple(int(d) for d in shape)
    if compute is None:
        if part is None:
            raise ValueError("lazy needs compute or part")
        compute = _assembled(part, want, dtype)

    def tensor() -> ir.Tensor:
        values = np.asarray(compute(), order="C")
        if values.shape != want or ir.DataType.from_numpy(values.dtype) != dtype:
            raise AssertionError(f"{name}: computed {values.dtype} {values.shape}, promised {dtype} {want}")
        return ir.tensor(values, name=name)
    if part is None:
        return ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(want), name=name)
    t = _PartLazyTensor(tensor, dtype=dtype, shape=ir.Shape(want), name=name)
    t.edgellama_part = part
    return t


def _assembled(compute_part: Callable[[int, Index], np.ndarray], shape: tuple[int, ...],
               dtype: ir.DataType) -> Callable[[], np.ndarray]:
    """The whole tensor written part by part (along axis 0) into one array: holds the result and one part."""
    if not shape:
        raise ValueError("a scalar tensor has no parts: give lazy() its compute")

    def whole() -> np.ndarray:
        out = np.empty(shape, dtype.numpy())
        step = max(1, CHUNK_BYTES // max(1, out[:1].nbytes))
        for a in range(0, shape[0], step):
            out[a:a + step] = compute_part(0, slice(a, min(a + step, shape[0])))
        return out
    return whole


def add_lazy(graph: ir.Graph, compute: Callable[[], np.ndarray], *, dtype: ir.DataType, shape: Sequence[int],
             name: str) -> ir.Value:
    """`add_initializer` for values computed when the model is written."""
    v = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype),
                 const_value=lazy(compute, dtype=dtype, shape=shape, name=name))
    graph.register_initializer(v)
    return v


def set_lazy(value: ir.Value, compute: Callable[[], np.ndarray] | None,
             part: Callable[[int, Index], np.ndarray] | None = None) -> None:
    """`set_array` for a new value of the same dtype and shape, computed when the model is written
    (and, with `part`, readable in parts; see `lazy`)."""
    t = value.const_value
    value.const_value = lazy(compute, dtype=t.dtype, shape=list(t.shape), name=value.name, part=part)


def output_like(value: ir.Value) -> ir.Value:
    """A new value to take `value`'s place: its name, type and shape."""
    kind = ir.TensorType(value.dtype) if isinstance(value.type, ir.TensorType) else value.type
    return ir.Value(name=value.name, type=kind, shape=None if value.shape is None else ir.Shape(list(value.shape)))


def replace(graph: ir.Graph, old: Sequence[ir.Node], new: Sequence[ir.Node],
            outputs: Sequence[ir.Value]) -> None:
    """Put `new` where `old[0]` was (so the order stays topological) and let `outputs` take the
    place of the old nodes' outputs, in order, graph outputs included."""
    graph.insert_before(old[0], new)
    before = [o for n in old for o in n.outputs]
    ir.convenience.replace_all_uses_with(before, list(outputs), replace_graph_outputs=True)
    graph.remove(old, safe=True)


def drop_unused(graph: ir.Graph) -> None:
    """Remove what no longer feeds anything: Transposes that fed a replaced MatMul, then the
    initializers no node reads (the float weights a pass replaced)."""
    def dead(v: ir.Value) -> bool:
        return not v.uses() and not v.is_graph_output()

    while unused := [n for n in graph if is_op(n, "Transpose") and all(dead(o) for o in n.outputs)]:
        graph.remove(unused, safe=True)
    for name in [name for name, v in graph.initializers.items() if dead(v)]:
        del graph.initializers[name]


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    model.opset_imports[domain] = max(model.opset_imports.get(domain, version), version)


def count_ops(model: ir.Model) -> dict[str, int]:
    """Main-graph op counts keyed `domain:op` (`:MatMul` for the standard domain)."""
    counts: dict[str, int] = {}
    for n in model.graph:
        key = f"{n.domain}:{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts
