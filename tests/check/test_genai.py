"""onnxruntime-genai loads our exported folders as they are (genai_config.json) and its greedy tokens
equal our Generator's: the folder is a drop-in model for genai, and our loop agrees with genai's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.genai

pytest.importorskip("onnxruntime_genai")

from edgellama.check import bench  # noqa: E402
from edgellama.runtime.generator import Generator  # noqa: E402
from tests.conftest import shared_export  # noqa: E402


def genai_greedy(folder, prompt, new_tokens: int, *, provider: str = "cpu") -> list[int]:
    """onnxruntime-genai's greedy tokens on a folder, stopping at its end-of-sequence ids as genai does.

    No `min_length` here: genai enforces it by masking the end-of-sequence logits, which turns a real
    end of answer into the second-best token, so the sequence would no longer be greedy."""
    runner = bench.GenaiRunner(Path(folder), name="genai", precision="?", provider=provider)
    og = runner.og
    params = og.GeneratorParams(runner.model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    gen = og.Generator(runner.model, params)
    gen.append_tokens(np.asarray([list(prompt)], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(x) for x in gen.get_sequence(0)[len(prompt):]]


def assert_genai_greedy_equals_ours(folder, *, new_tokens: int = 16) -> None:
    """onnxruntime-genai's greedy tokens on `folder` are our Generator's, up to genai's stop at the
    end of sequence: a 9-token prompt of random ids (seed 3)."""
    ours = Generator(folder, provider="cpu")
    prompt = bench.bench_prompt(ours.config.vocab_size, 9, seed=3)
    mine = ours.generate_ids(prompt, max_new_tokens=new_tokens, eos=False)[0].token_ids
    assert genai_greedy(folder, prompt, new_tokens) == _until_eos(mine, genai_eos_ids(folder))


def genai_eos_ids(folder) -> set[int]:
    """The end-of-sequence ids genai stops on, from the folder's genai_config.json."""
    eos = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def _until_eos(tokens, eos):
    """The tokens before the first end-of-sequence id: genai stops there and leaves it out."""
    for i, t in enumerate(tokens):
        if t in eos:
            return list(tokens[:i])
    return list(tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    return shared_export(tmp_path_factory, "tiny")


def test_genai_greedy_equals_ours_on_tiny(tiny):
    assert_genai_greedy_equals_ours(tiny)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_genai_greedy_equals_ours_on_smollm2(tmp_path_factory, target):
    folder = shared_export(tmp_path_factory, "smollm2", target=target)
    ours = Generator(folder, provider="cpu")
    prompt = ours.encode("What is the capital of France?", chat=True)
    mine = ours.generate_ids(prompt, max_new_tokens=24, eos=False)[0].token_ids
    theirs = genai_greedy(folder, prompt, 24)
    assert theirs == _until_eos(mine, genai_eos_ids(folder))
    # Both ended the answer before the token limit (the end-of-sequence handling agrees), and it is Paris.
    assert len(theirs) < 24 and "Paris" in ours.decode(theirs)
