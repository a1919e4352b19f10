"""Rank-0 initializers (the exported SiLU's 1.0) keep their shape through the quantization helpers:
numpy's ascontiguousarray makes a scalar 1-D, which ONNX Runtime refuses as a replacement."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgellama.quant import common


def test_lazy_and_set_array_keep_a_scalar_scalar():
    graph = ir.Graph([], [], nodes=[])
    v = common.add_initializer(graph, np.array(1.0, np.float32), "one")
    assert v.shape == ir.Shape([]) and v.const_value.numpy().shape == ()
    common.set_array(v, np.array(2.0, np.float16))
    assert v.const_value.numpy().shape == ()
    t = common.lazy(lambda: np.array(3.0, np.float32), dtype=ir.DataType.FLOAT, shape=(), name="three")
    assert t.numpy().shape == () and float(t.numpy()) == 3.0
