"""What every quantization pass shares: the request's rules, finding the weights, the graph edits.

Passes work on an `onnx.ModelProto` whose weights are loaded (numpy in, numpy out): the graphs are
small (a few hundred nodes) and the weights are the only large thing, so plain protos are the
simplest representation that every target (portable, ort, onnx23) shares.

A *weight MatMul* is a standard `MatMul` whose second input is a 2-D float initializer `W [K, N]`
(the exporter stores `nn.Linear` weights transposed, in x out) or a `Transpose(perm=[1, 0])` of
one. Activations stay as they are; only these nodes (and the embedding `Gather`) are rewritten.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellama.errors import QuantError

MS_DOMAIN = "com.microsoft"
MODES = ("fp16", "int8", "int8-dynamic", "int4")
# MatMulNBits (and GatherBlockQuantized) need a power of two >= 16; ONNX Runtime's CPU kernels
# (MLAS) implement 16..256. Per-channel (block = K) is not offered: K of real models (576, 2048)
# is rarely a power of two.
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = {"int8": 32, "int4": 32}


def check_block_size(mode: str, block_size: int | None) -> int | None:
    """The block size `mode` will use, or QuantError for one the kernels do not support."""
    if mode not in DEFAULT_BLOCK_SIZE:
        if block_size is not None:
            raise QuantError(f"--block-size applies to int8 and int4 only, not to {mode}")
        return None
    if block_size is None:
        return DEFAULT_BLOCK_SIZE[mode]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise QuantError(f"block size {block_size!r} is not supported by MatMulNBits; "
                         f"choose one of {', '.join(map(str, BLOCK_SIZES))}")
    return block_size


# -- finding weights ------------------------------------------------------------------------------
@dataclasses.dataclass
class WeightMatMul:
    node: onnx.NodeProto
    weight: str            # initializer name
    transposed: bool       # the MatMul reads Transpose(weight): W = weight.T


def module_name(node: onnx.NodeProto) -> str:
    """`model.layers.3.mlp.down_proj` for the node `model.layers.3.mlp.down_proj/MatMul`."""
    return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name


def excluded(node: onnx.NodeProto, patterns: Sequence[str]) -> bool:
    """True when a pattern (fnmatch) matches the node name, its module path or a module prefix:
    `lm_head`, `model.layers.0.*` and `*.down_proj` all work."""
    mod = module_name(node)
    prefixes = [".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in (node.name, mod, *prefixes))


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            found.setdefault(i, []).append(n)
    return found


def weight_matmuls(graph: onnx.GraphProto, *, exclude: Sequence[str] = ()) -> list[WeightMatMul]:
    """Every MatMul with a constant 2-D float weight, in graph order, minus the excluded ones."""
    inits = initializers(graph)
    writers = producers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or excluded(node, exclude):
            continue
        name, transposed = node.input[1], False
        prod = writers.get(name)
        if name not in inits and prod is not None and prod.op_type == "Transpose":
            perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0] and prod.input[0] in inits:
                name, transposed = prod.input[0], True
        t = inits.get(name)
        if t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            continue
        found.append(WeightMatMul(node, name, transposed))
    return found


def embedding_gathers(graph: onnx.GraphProto, *, exclude: Sequence[str] = ()) -> list[onnx.NodeProto]:
    """Gather nodes reading rows (axis 0) of a 2-D float initializer: the token embedding."""
    inits = initializers(graph)
    out = []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or excluded(node, exclude):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        t = inits.get(node.input[0])
        if axis == 0 and t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT:
            out.append(node)
    return out


def weight_array(graph: onnx.GraphProto, wm: WeightMatMul) -> np.ndarray:
    """W as the MatMul uses it: [K, N] float32."""
    w = numpy_helper.to_array(initializers(graph)[wm.weight])
    return np.ascontiguousarray(w.T if wm.transposed else w, dtype=np.float32)


# -- editing ------------------------------------------------------------------------------------
def renamed(node: onnx.NodeProto, op_type: str) -> str:
    """Keep the module path in the name (parity localizes blocks by it), change the op suffix."""
    return f"{module_name(node)}/{op_type}" if node.name else ""


def replace_nodes(graph: onnx.GraphProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Replace each node whose first output is a key by a list of nodes, in place (so the order
    stays topological). Keyed by output name: protobuf hands out fresh wrappers, not stable ids."""
    new = []
    for node in graph.node:
        new.extend(replacements.get(node.output[0], [node]))
    del graph.node[:]
    graph.node.extend(new)


def drop_unused_initializers(graph: onnx.GraphProto) -> list[str]:
    """Remove what no longer feeds anything: Transposes that fed a replaced MatMul, then the
    initializers no node reads (the float weights a pass replaced). Returns the dropped names."""
    def used() -> set[str]:
        names = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in graph.node:  # the exporter writes no subgraphs; stay correct if one appears
            for a in n.attribute:
                if a.HasField("g"):
                    names |= {i for sn in a.g.node for i in sn.input}
        return names

    while True:
        live = used()
        dead = [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & live]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    live = used()
    keep = [t for t in graph.initializer if t.name in live]
    dropped = [t.name for t in graph.initializer if t.name not in live]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return dropped


def add_initializer(graph: onnx.GraphProto, array: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def constant(output: str, array: np.ndarray, *, name: str) -> onnx.NodeProto:
    """A Constant node (kept inline in model.onnx, where shape inference can read it)."""
    return helper.make_node("Constant", [], [output], name=name, value=numpy_helper.from_array(array, output))


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {v.name for v in graph.input}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Main-graph op counts keyed `domain:op` (`:MatMul` for the standard domain)."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}:{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def pattern_list(exclude: Iterable[str] | str | None) -> tuple[str, ...]:
    """`--exclude a,b` or a list of names -> tuple of patterns."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = [exclude]
    return tuple(p.strip() for item in exclude for p in str(item).split(",") if p.strip())
