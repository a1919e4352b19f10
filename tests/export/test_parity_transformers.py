"""Our torch Llama against transformers' LlamaForCausalLM (eager attention, fp32, the same weights):
logits through prefill and 16 KV-cache decode steps within 1e-4, and identical 32-token greedy runs,
on tiny random variants covering every block option and on the real smollm2."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")   # a dev extra

from edgellama.export import config as presets  # noqa: E402
from edgellama.export import sources  # noqa: E402
from edgellama.export.model import greedy_generate, positions_from_mask  # noqa: E402
from tests.conftest import (diff_vs_transformers, hf_greedy, left_padded_batch, seeded_llama,  # noqa: E402
                            smollm2_model, teacher_forced_vs_transformers)
from tests.conftest import hf_reference as reference  # noqa: E402

TOL = 1e-4
DECODE_STEPS = 16
GREEDY = 32

VARIANTS = {
    "default": {},
    "llama3-rope": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        # small enough that head_dim 16's frequencies fall in all three llama3 bands
        "original_max_position_embeddings": 32}},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "gqa-6q-2kv-hd32": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32},
    "tied": {"tie_word_embeddings": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_pair(request):
    config = presets.tiny(**VARIANTS[request.param])
    ours = seeded_llama(config, seed=7)
    return request.param, ours, reference(ours)


def test_tiny_logits_prefill_and_decode(tiny_pair):
    name, ours, hf = tiny_pair
    ids, mask = left_padded_batch(ours.config.vocab_size, (12, 8), seed=1)
    diff = diff_vs_transformers(ours, hf, ids, mask, DECODE_STEPS)
    print(f"tiny {name}: left-padded batch of 2, prefill + {DECODE_STEPS} decode, max abs logits diff {diff:.2e}")
    assert diff <= TOL


def test_tiny_greedy_identical(tiny_pair):
    name, ours, hf = tiny_pair
    ids, mask = left_padded_batch(ours.config.vocab_size, (10, 6), seed=2)
    mine = greedy_generate(ours, ids, GREEDY, attention_mask=mask)
    theirs = hf_greedy(hf, ids, mask, GREEDY)
    assert mine.shape == (2, GREEDY)
    assert torch.equal(mine, theirs)


def test_tiny_logits_are_not_degenerate():
    """The built-in tiny weights give peaked, input-dependent logits, so the checks above mean something."""
    model, _, _ = sources.load_model("tiny")
    ids, mask = left_padded_batch(model.config.vocab_size, (16,), seed=3)
    with torch.no_grad():
        logits, _ = model(ids, mask, positions_from_mask(mask, 16), model.empty_cache(1))
    top2 = logits[0].topk(2, dim=-1).values
    assert logits.std() > 0.05
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4     # no near-ties that 1e-5 noise could flip
    assert len(set(logits[0].argmax(-1).tolist())) > 4


def test_hf_folder_loads_in_transformers_with_same_logits(tmp_path):
    """save_hf_folder writes what from_pretrained reads: the same logits as our model."""
    folder = sources.save_hf_folder("tiny", tmp_path / "hf")
    ours, _, _ = sources.load_model("tiny")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    ids, mask = left_padded_batch(ours.config.vocab_size, (9, 5), seed=4)
    assert diff_vs_transformers(ours, hf, ids, mask, 4) <= TOL


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, info = smollm2_model()
    return model, tokenizer, info, reference(model)


@pytest.mark.slow
def test_smollm2_logits_and_greedy(smollm2):
    """One pass serves both checks (CI time): logits within TOL over prefill and GREEDY (>= 16) decode
    steps, and transformers' greedy choice equal to ours at each of them (identical greedy tokens)."""
    ours, tok, _, hf = smollm2
    prompts = [tok.chat_ids("What is the capital of France?"), tok.chat_ids("Name a colour.")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    diff, same = teacher_forced_vs_transformers(ours, hf, ids, mask, GREEDY)
    print(f"smollm2: left-padded batch of 2, prefill + {GREEDY} decode, max abs logits diff {diff:.2e}")
    assert diff <= TOL
    assert same


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    ours, tok, _, _ = smollm2
    ids = torch.tensor([tok.chat_ids("What is the capital of France?")])
    out = greedy_generate(ours, ids, GREEDY, eos_token_ids=ours.config.eos_token_ids)
    answer = tok.decode(out[0].tolist())
    print(f"smollm2: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2):
    """transformers' GGUF loader (an independent dequantizer and Q/K un-permutation) gives our weights."""
    ours, _, info, _ = smollm2
    path = sources.smollm2_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).state_dict()
    mine = ours.state_dict()
    assert set(k for k in theirs if "rotary" not in k) == set(mine)
    worst = max((mine[k] - theirs[k].float()).abs().max().item() for k in mine)
    print(f"smollm2: max abs weight diff vs transformers' GGUF loader {worst:.1e}")
    assert worst <= 1e-6


def test_comparison_sees_a_rope_difference():
    """The harness is sensitive: the same weights under another rope scaling differ well past TOL."""
    ours = seeded_llama(presets.tiny(**VARIANTS["llama3-rope"]), seed=7)
    plain = seeded_llama(presets.tiny(rope_theta=500000.0), seed=7)
    ids, mask = left_padded_batch(ours.config.vocab_size, (40,), seed=5)
    assert diff_vs_transformers(ours, reference(plain), ids, mask, 2) > 100 * TOL
