"""What the `onnx23` rules share: the opset, and which tensor types an opset-23 op takes."""

from __future__ import annotations

import onnx.defs
import onnx_ir as ir

OPSET = 23


def type_refusal(op_type: str, param: str, value: ir.Value) -> str | None:
    """Why `value` may not bind type parameter `param` of the opset-23 `op_type` (None when it may);
    read from onnx's own schema, so the lowered graph is valid for the checker."""
    schema = onnx.defs.get_schema(op_type, OPSET, "")
    allowed = next(tc.allowed_type_strs for tc in schema.type_constraints if tc.type_param_str == param)
    if value.dtype is None:
        return f"{value.name} has no known dtype"
    # onnx spells tensor types by the lower-case TensorProto name: tensor(float), tensor(float16), ...
    if f"tensor({value.dtype.name.lower()})" not in allowed:
        return f"{op_type}-{OPSET} does not take {value.dtype.name.lower()} for {param} (allowed: {', '.join(allowed)})"
    return None
