"""Quantized models in CI: `tiny` quantized in every mode, on every target, passes parity against
torch under the tolerances of its own precision (read from the manifest), and fails under fp32's.

The second half is what makes the first mean something: the quantization error is really there,
and the precision-aware table is what lets it through.
"""

from __future__ import annotations

import pytest

from edgellama.quant.api import quantize_folder
from edgellama.check import parity
from edgellama.folder import Manifest
from edgellama.testing import assert_parity
from tests.conftest import shared_export

MODES = ["fp16", "int8", "int8-dynamic", "int4"]
TARGETS = ["portable", "ort", "onnx23"]


@pytest.fixture(scope="module", params=TARGETS)
def exported(request, tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny", target=request.param)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_tiny_passes_parity_at_its_precision(exported, tmp_path, mode):
    import json

    q = quantize_folder(exported, tmp_path / mode, mode=mode)
    manifest = Manifest.from_dict(json.loads((q / "edgellama.json").read_text()))
    assert manifest.precision == mode

    report = assert_parity(q, reference="torch", decode_steps=3)
    assert report["precision"] == mode

    strict = parity.run_parity(q, reference="torch", decode_steps=3, precision="fp32", localize_failures=False)
    assert not parity.report_passed(strict)


def test_precision_of_reads_the_pass_and_the_dtype():
    assert Manifest(config={}, **{"dtype": "fp32"}).precision == "fp32"
    assert Manifest(config={}, **{"dtype": "fp16"}).precision == "fp16"
    assert Manifest(config={}, **{"dtype": "fp32", "quantization": [{"pass": "int8-dynamic"}]}).precision == "int8-dynamic"
    assert Manifest(config={}, **{"dtype": "fp32", "quantization": [{"pass": "int4"}]}).precision == "int4"
    assert Manifest(config={}, **{"dtype": "fp32", "quantization": [{"mode": "int8"}]}).precision == "int8"
