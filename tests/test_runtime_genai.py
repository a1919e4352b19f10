"""onnxruntime-genai loads our exported folders as they are (genai_config.json) and its greedy tokens
equal our Generator's: the folder is a drop-in model for genai, and our loop agrees with genai's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.genai

pytest.importorskip("onnxruntime_genai")

from edgellama.runtime import bench  # noqa: E402
from edgellama.runtime.generator import Generator  # noqa: E402


def _export(source, out, target="portable"):
    from edgellama.export.onnx_export import export_model

    return export_model(source, out, target=target, force=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    import torch

    torch.manual_seed(0)
    return _export("tiny", tmp_path_factory.mktemp("genai") / "tiny")


def test_genai_greedy_equals_ours_on_tiny(tiny):
    ours = Generator(tiny, provider="cpu")
    prompt = bench.bench_prompt(ours.config.vocab_size, 9, seed=3)
    mine = ours.generate_ids(prompt, max_new_tokens=16, stop=False)[0].token_ids
    assert bench.genai_greedy(tiny, prompt, 16) == mine


@pytest.mark.slow
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_genai_greedy_equals_ours_on_smollm2(tmp_path_factory, target):
    folder = _export("smollm2", tmp_path_factory.mktemp("genai") / f"smollm2-{target}", target=target)
    ours = Generator(folder, provider="cpu")
    prompt = ours.encode("What is the capital of France?", chat=True)
    mine = ours.generate_ids(prompt, max_new_tokens=24, stop=False)[0].token_ids
    assert bench.genai_greedy(folder, prompt, 24) == mine
