"""Streaming quantization: a pass computes nothing of size when it runs; each weight is read,
quantized and written when the folder is written, one at a time, with the same bytes each time."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgellama import folder
from edgellama.quant import common
from edgellama.quant.api import quantize_model
from tests.quant.conftest import quantized_pair

# Constants a pass builds eagerly on purpose: shapes, split sizes, norm weights (a row of floats).
SMALL_BYTES = 4096


@pytest.mark.parametrize("mode", ["int4", "int8", "int8-dynamic", "fp16"])
def test_a_pass_leaves_every_weight_lazy_and_writes_the_folders_bytes(tmp_path_factory, tmp_path, mode):
    fp32, expected = quantized_pair(tmp_path_factory, "portable", mode)
    model = folder.load_model_ir(fp32)
    quantize_model(model, mode=mode, target="portable")
    big = {name: v.const_value for name, v in model.graph.initializers.items() if v.const_value.nbytes > SMALL_BYTES}
    eager = [name for name, t in big.items() if not isinstance(t, (ir.LazyTensor, ir.ExternalTensor))]
    assert big and not eager, eager
    # the source weights' file mappings (smoothing's calibration opened them) are closed again
    assert not [t.name for t in big.values() if isinstance(t, ir.ExternalTensor) and t.raw is not None]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    a, b = folder.save_model(model, first), folder.save_model(model, second)
    assert a == b == folder.FileRecord(bytes=(expected / folder.DATA).stat().st_size,
                                       sha256=folder.read_manifest(expected).files[folder.DATA].sha256)


def test_deferred_results_are_computed_once_per_write_and_not_kept():
    """The parts of one computation (codes, scales) share one run; the next computation drops it."""
    runs = []

    def compute(tag):
        runs.append(tag)
        return np.full(3, tag, np.float32), np.full(2, tag + 0.5, np.float32)

    one, two = common.Deferred(lambda: compute(1.0)), common.Deferred(lambda: compute(2.0))
    parts = [one.part(lambda r: r[0]), one.part(lambda r: r[1]), two.part(lambda r: r[0]), two.part(lambda r: r[1])]
    values = [p() for p in parts]
    assert runs == [1.0, 2.0]
    assert [v.tolist() for v in values] == [[1, 1, 1], [1.5, 1.5], [2, 2, 2], [2.5, 2.5]]
    assert parts[0]().tolist() == [1, 1, 1] and runs == [1.0, 2.0, 1.0]   # recomputed, not kept
