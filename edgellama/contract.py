"""The graph contract of an exported decoder, in numpy: the one home of its I/O names, the empty
past of a first call, left padding and the position ids that follow from a mask.

    inputs   input_ids [B, S] int64, attention_mask [B, T] int64 (T = past + S),
             position_ids [B, S] int64, past_key_values.{i}.key / .value [B, H_kv, past, D]
    outputs  logits [B, S, V], present.{i}.key / .value [B, H_kv, T, D]

Positions follow transformers' `generate` for left padding: `cumsum(mask) - 1`, padding slots at 1
(any valid row of the rope cache). export/model.py's `positions_from_mask` is the same rule on
torch tensors, for the torch blocks that the graph is traced from.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
KV_KINDS = ("key", "value")


def past_names(n_layers: int) -> list[str]:
    """[past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ...]"""
    return [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in KV_KINDS]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layers) for kind in KV_KINDS]


def input_names(n_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]


def empty_past(*, batch: int, n_layers: int, kv_heads: int, head_dim: int,
               dtype: Any = np.float32) -> list[np.ndarray]:
    """The past of a first call, flat: [k0, v0, k1, v1, ...], each [batch, kv_heads, 0, head_dim]."""
    shape = (batch, kv_heads, 0, head_dim)
    return [np.zeros(shape, dtype=dtype) for _ in range(2 * n_layers)]


def pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    """[k0, v0, k1, v1, ...] -> [(k0, v0), (k1, v1), ...]; pairs pass through."""
    flat = list(flat)
    if flat and isinstance(flat[0], (tuple, list)):
        return [tuple(p) for p in flat]
    return list(zip(flat[0::2], flat[1::2]))


def flatten(past: Sequence[Any]) -> list[Any]:
    """[(k0, v0), ...] -> [k0, v0, ...]; a flat list passes through."""
    past = list(past)
    if past and isinstance(past[0], (tuple, list)):
        return [t for pair in past for t in pair]
    return past


def positions_from_mask(attention_mask: np.ndarray, q_len: int | None = None) -> np.ndarray:
    """Position ids [B, q_len] of the last `q_len` slots of `attention_mask` [B, T]:
    `cumsum(mask) - 1`, padding slots at 1."""
    mask = np.asarray(attention_mask)
    pos = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    if q_len is not None:
        pos = pos[:, -q_len:]
    return np.ascontiguousarray(pos, dtype=np.int64)


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, longest] of rows of token ids, padded on the left."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, longest - len(r):] = r
            mask[i, longest - len(r):] = 1
    return ids, mask


def describe_io(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of a model's graph inputs and outputs (onnx_ir Model or ModelProto),
    as the manifest's `io` records them."""
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)

    def one(v):
        return {"name": v.name, "dtype": str(v.dtype.name).lower() if v.dtype is not None else None,
                "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None}

    return {"inputs": [one(v) for v in model.graph.inputs], "outputs": [one(v) for v in model.graph.outputs]}
