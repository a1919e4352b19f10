"""Quantized models in CI: `tiny` quantized in every mode, on every target, passes parity against
torch under the tolerances of its own precision (read from the manifest), and fails under fp32's.

The second half is what makes the first mean something: the quantization error is really there,
and the precision-aware table is what lets it through.
"""

from __future__ import annotations

import pytest

from edgellama.quant.api import quantize_folder
from edgellama.runtime import parity
from edgellama.runtime.parity_tolerances import precision_of
from edgellama.testing import assert_parity

MODES = ["fp16", "int8", "int8-dynamic", "int4"]
TARGETS = ["portable", "ort", "onnx23"]


@pytest.fixture(scope="module", params=TARGETS)
def exported(request, tmp_path_factory):
    from edgellama.export.onnx_export import export_model

    return export_model("tiny", tmp_path_factory.mktemp("pq") / request.param, target=request.param)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_tiny_passes_parity_at_its_precision(exported, tmp_path, mode):
    import json

    q = quantize_folder(exported, tmp_path / mode, mode=mode)
    manifest = json.loads((q / "edgellama.json").read_text())
    assert precision_of(manifest) == mode

    report = assert_parity(q, reference="torch", decode_steps=3)
    assert report["precision"] == mode

    strict = parity.run_parity(q, reference="torch", decode_steps=3, precision="fp32", localize_failures=False)
    assert not parity.report_passed(strict)


def test_precision_of_reads_the_pass_and_the_dtype():
    assert precision_of({"dtype": "fp32"}) == "fp32"
    assert precision_of({"dtype": "fp16"}) == "fp16"
    assert precision_of({"dtype": "fp32", "quantization": [{"pass": "int8-dynamic"}]}) == "int8-dynamic"
    assert precision_of({"dtype": "fp32", "quantization": [{"pass": "int4"}]}) == "int4"
    assert precision_of({"dtype": "fp32", "quantization": [{"mode": "int8"}]}) == "int8"
