"""tests/runtime's own helpers: a tiny model that writes text (for stop strings, chat sessions,
repetition penalty against transformers).

tiny's random lm_head spreads the choice over its whole 512-id vocabulary, most of it reserved
specials that decode to nothing; here its rows outside printable ASCII and newline are zeroed (and
the rest scaled up), so greedy and sampled outputs are text with well-separated logits. The same
weights are written as a transformers folder (the reference) and exported as static and dynamic
ort folders (with tiny's byte-level tokenizer and ChatML template).
"""

from __future__ import annotations

import pytest

TEXT_IDS = [3 + 10, *range(3 + 32, 3 + 127)]     # tiny's byte tokens sit at 3 + byte


def ascii_head(weights):
    import torch

    w = dict(weights)
    head = w["lm_head.weight"].clone() * 4
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[TEXT_IDS] = True
    head[~keep] = 0
    w["lm_head.weight"] = head
    return w


@pytest.fixture(scope="session")
def text_folders(tmp_path_factory):
    """{"hf": transformers folder, "static": ort static folder, "dynamic": ort dynamic folder}."""
    pytest.importorskip("torch")
    from edgellama.export import sources
    from tests.conftest import shared_export

    root = tmp_path_factory.mktemp("text-model")
    hf = sources.save_hf_folder("tiny", root / "hf", transform=ascii_head)
    # shared_export: the two contracts lowered from one trace of the folder.
    return {"hf": hf, "static": shared_export(tmp_path_factory, str(hf), target="ort"),
            "dynamic": shared_export(tmp_path_factory, str(hf), target="ort", kv_cache="dynamic")}
