"""Parity's probe sessions: intermediate values exposed as extra outputs of an in-memory graph
(check/parity_sides.py's `with_outputs`), on the hand-built toy graph of tests/conftest.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.check.parity_sides import with_outputs
from edgellama.errors import RuntimeInputError

from tests.conftest import build_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("toy") / "model")


def test_extra_outputs_expose_intermediate_values_without_touching_the_folder(toy):
    before = sorted(p.name for p in toy.iterdir())
    m = with_outputs(toy, ["h0", "x"], provider="cpu")
    ids, mask = np.array([[3, 4]]), np.ones((1, 2), np.int64)
    logits, _, extra = m.forward(ids, mask, np.arange(2)[None], m.empty_past(1))
    assert set(extra) == {"h0", "x"}
    emb = extra["x"]
    np.testing.assert_allclose(extra["h0"], emb + emb.sum(axis=1, keepdims=True), rtol=1e-6)
    assert sorted(p.name for p in toy.iterdir()) == before
    with pytest.raises(RuntimeInputError, match="no value named 'nope'"):
        with_outputs(toy, ["nope"], provider="cpu")
