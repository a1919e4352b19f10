"""The graph contract in numpy: I/O names, the first call's empty past, pairs/flatten of the
KV list, left padding and the position ids that follow from a mask (the same rule as the torch
blocks')."""

import numpy as np
import pytest
import torch

from edgellama import contract
from edgellama.contract import positions_from_mask


def test_positions_from_mask_matches_torch_reference():
    from edgellama.export.model import positions_from_mask as torch_positions

    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for q in (5, 1):
        assert (positions_from_mask(mask, q) == torch_positions(torch.from_numpy(mask), q).numpy()).all()


def test_positions_count_real_slots_and_park_padding_at_one():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]
    decode = positions_from_mask(np.array([[0, 1, 1, 1, 1]]), 1)
    assert decode.tolist() == [[3]] and decode.dtype == np.int64 and decode.flags.c_contiguous


def test_left_pad():
    ids, mask = contract.left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64
    ids, _ = contract.left_pad([[4], [1, 2]], pad_id=9)
    assert ids.tolist() == [[9, 4], [1, 2]]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_empty_past_shapes(dtype):
    past = contract.empty_past(batch=3, n_layers=2, kv_heads=4, head_dim=8, dtype=dtype)
    assert len(past) == 4
    assert all(t.shape == (3, 4, 0, 8) and t.dtype == dtype for t in past)


def test_pairs_and_flatten_round_trip():
    flat = ["k0", "v0", "k1", "v1"]
    assert contract.pairs(flat) == [("k0", "v0"), ("k1", "v1")]
    assert contract.flatten(contract.pairs(flat)) == flat
    # each passes its own form through
    assert contract.pairs([("k0", "v0")]) == [("k0", "v0")]
    assert contract.flatten(flat) == flat
    assert contract.pairs([]) == [] and contract.flatten([]) == []


def test_io_names_follow_the_contract():
    assert contract.input_names(2) == ["input_ids", "attention_mask", "position_ids",
                                       "past_key_values.0.key", "past_key_values.0.value",
                                       "past_key_values.1.key", "past_key_values.1.value"]
    assert contract.output_names(1) == ["logits", "present.0.key", "present.0.value"]
