"""What the lowering tests share: one tiny portable export, op counts, a rule applied alone.

Parity: prefill + 8 decode steps through the KV cache on a left-padded batch of two, logits max
abs diff <= TOL in fp32 against the torch blocks (`export/model.py`); the padded row equals that
row run alone.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from edgellama.export import onnx_export as E
from edgellama.export.lower import engine
from tests.conftest import OrtLoop, ort_session, portable_copy, random_llama

TOL = 1e-4
LAYERS = 3


def ops(ir_model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in ir_model.graph)


def io_signature(ir_model):
    return [(v.name, v.dtype, [str(d) for d in v.shape])
            for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs)]


def apply_rule(ir_model, rule: engine.Rule, provider: str = "cpu") -> engine.Report:
    """`rule` alone over `ir_model` (in place), as a target's driver would apply it."""
    return engine.apply(ir_model, [rule], engine.Context(ir_model.graph, provider))


def node_named(ir_model, name: str) -> ir.Node:
    return next(n for n in ir_model.graph if n.name == name)


class FiniteLoop(OrtLoop):
    """An OrtLoop that checks every present cache it returns is finite (masked rows included)."""

    def step(self, ids, mask, past):
        logits, present = super().step(ids, mask, past)
        assert all(np.isfinite(k).all() and np.isfinite(v).all() for k, v in present)
        return logits, present


def portable_fp16():
    """A fresh fp16 portable model of `random_llama(layers=LAYERS)`, traced once in the session."""
    return portable_copy(random_llama(layers=LAYERS), key=f"random_llama-{LAYERS}", dtype="fp16")


@pytest.fixture(scope="package")
def portable_fp32():
    model = random_llama(layers=LAYERS)
    # Lowering edits in place: every test gets its own copy of the exported model. Traced once in the
    # session (portable_copy): tests/export/test_export.py reads the same trace.
    return model, lambda: portable_copy(model, key=f"random_llama-{LAYERS}")


@pytest.fixture(scope="package")
def onnx23_fp32_loop(portable_fp32, tmp_path_factory):
    from edgellama.export.lower import lower_onnx23

    model, fresh = portable_fp32
    return model, FiniteLoop(ort_session(lower_onnx23(fresh()), tmp_path_factory.mktemp("onnx23")),
                             model.config, "fp32")
