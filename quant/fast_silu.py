"""Every quantization mode: the exported SiLU, x / (1 + exp(-x)), back to x * Sigmoid(x).

The export writes the exact form for fp32's sake (export/onnx_export.py: ONNX Runtime's CPU fuses
x * Sigmoid(x) into QuickGelu on an approximate logistic). A quantized model's own rounding is
orders of magnitude larger than that approximation, and there four elementwise kernels per layer
instead of one fused kernel are a cost every decode step pays (bench/silu.py measures both forms),
so every mode (fp16, int8, int8-dynamic, int4) rewrites it, after its own pass (quant/api.py).

    Div(x, Add(Exp(Neg(x)), 1))  ->  Mul(x, Sigmoid(x))

`refusal` says why a Div is left as it is; the rewrite keeps the Div's output value (its name and
readers) and drops the constant 1 when nothing else reads it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgellama.export.lower.engine import Context
from edgellama.quant import common


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return common.read(value.const_value)


def _only_reader(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _match(div: ir.Node) -> tuple[ir.Node, ir.Node, ir.Node, ir.Value] | str:
    """(Add, Exp, Neg, the constant 1) of an exported SiLU ending in `div`, or why it is not one."""
    if not common.is_op(div, "Div") or len(div.inputs) != 2:
        return "not a Div"
    x, denominator = div.inputs
    add = denominator.producer() if denominator is not None else None
    if add is None or not common.is_op(add, "Add") or not _only_reader(denominator):
        return "the denominator is not an Add read only here"
    exps = [v for v in add.inputs if v is not None and v.producer() is not None
            and common.is_op(v.producer(), "Exp")]
    if len(exps) != 1:
        return "the Add does not read one Exp"
    one = add.inputs[1] if add.inputs[0] is exps[0] else add.inputs[0]
    value = _const(one)
    if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 1.0:
        return "the Add's other input is not the constant 1"
    exp = exps[0].producer()
    neg = exp.inputs[0]
    if not _only_reader(exps[0]) or neg is None or neg.producer() is None or not common.is_op(neg.producer(), "Neg"):
        return "the Exp does not read a Neg read only there"
    if not _only_reader(neg) or neg.producer().inputs[0] is not x:
        return "the Neg does not negate the Div's numerator"
    return add, exp, neg.producer(), one


def refusal(div: ir.Node) -> str | None:
    """Why `div` is not an exported SiLU (None when it is)."""
    found = _match(div)
    return found if isinstance(found, str) else None


def apply(model: ir.Model) -> int:
    """Rewrite every exported SiLU of the main graph in place; returns how many."""
    ctx, rewritten = Context(model.graph), 0
    for div in list(model.graph):
        if div.graph is None or isinstance(found := _match(div), str):
            continue
        add, exp, neg, one = found
        x = div.inputs[0]
        sigmoid = common.op("Sigmoid", [x], [f"{div.name}/sigmoid"], name=f"{div.name}/Sigmoid")
        mul = common.op("Mul", [x, sigmoid.outputs[0]], [ir.Value()], name=div.name)
        model.graph.insert_before(div, [sigmoid, mul])
        ctx.rewire([div.outputs[0]], [mul.outputs[0]])   # the Div's output name, shape and readers
        model.graph.remove([div, add, exp, neg], safe=True)
        if one.is_initializer() and not one.uses() and not one.is_graph_output():
            model.graph.initializers.pop(one.name)
        rewritten += 1
    return rewritten
