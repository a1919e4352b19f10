"""Every mode on the real smollm2 (slow): finite logits and KL bounds against the fp32 export.

Bounds are ~2x the figures measured with 16 windows of 256 tokens (quant/*.py docstrings,
.notes/quant.md); this test uses one 128-token window of English, so it is noisier.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.quant.api import quantize_folder
from tests.conftest import shared_export
from tests.quant.conftest import logits, mean_kl

pytestmark = pytest.mark.slow

# mode -> mean KL bound. Measured over 4,096 tokens: fp16 1.2e-5, int8 3.1e-3, int8-dynamic 2.6e-2,
# int4 0.13; on this one 128-token window (2026-12-01): 6.0e-6, 4.4e-3, 4.5e-2, 0.21.
BOUNDS = {"fp16": 1e-4, "int8": 1e-2, "int8-dynamic": 6e-2, "int4": 0.4, "int4-fast": 0.8}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return shared_export(tmp_path_factory, "smollm2")


@pytest.fixture(scope="module")
def text_ids(smollm2):
    import json

    from tokenizers import Tokenizer

    text = json.__doc__ + "\n\n" + (np.__doc__ or "")
    ids = Tokenizer.from_file(str(smollm2 / "tokenizer.json")).encode(text).ids[:128]
    return np.array([ids], np.int64)


@pytest.fixture(scope="module")
def fp32_logits(smollm2, text_ids):
    """The fp32 export's logits, the reference of every mode (one session, not one per mode)."""
    return logits(smollm2, text_ids)


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_mode_close_to_fp32(smollm2, text_ids, fp32_logits, tmp_path, mode):
    q = quantize_folder(smollm2, tmp_path / mode, mode=mode)
    a, b = fp32_logits, logits(q, text_ids)
    assert np.isfinite(b).all()
    kl = mean_kl(a, b)
    print(f"smollm2 {mode}: mean KL {kl:.2e} against the fp32 export (bound {BOUNDS[mode]:.0e})")
    assert kl < BOUNDS[mode]
