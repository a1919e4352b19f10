"""Numerical error of tensors and agreement of next-token distributions: the one home of the
metrics parity gates and quality reports (KL, top-1, log-softmax).

Everything is computed in float64 numpy over the *valid* positions only (a boolean mask picks
them), because left-padded rows carry values no caller ever reads: counting them would fail a
correct model whose padding rows differ, or pass a broken one by averaging over noise.

Definitions (the JSON schema in docs/parity-schema.md repeats them):
  max_abs      max |ref - got|
  max_rel      max |ref - got| / max |ref|: error relative to the tensor's own range, so logits
               of any scale share one tolerance (elementwise ratios explode where ref ~ 0)
  p999_abs     99.9th percentile of |ref - got|: one outlier element does not hide the bulk
  cosine       cosine similarity of the flattened tensors
  kl_mean/max  KL(P_ref || P_got) of softmax(logits) per position, in nats
  top1         fraction of positions whose argmax agrees
  top5         mean overlap |top5(ref) & top5(got)| / 5
  top1_in_top5 fraction of positions whose reference argmax is in the candidate's top 5
"""

from __future__ import annotations

from typing import Any

import numpy as np

TENSOR_KEYS = ("max_abs", "max_rel", "p999_abs", "cosine")
LOGIT_KEYS = TENSOR_KEYS + ("kl_mean", "kl_max", "top1", "top5", "top1_in_top5")


def _valid(x: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Rows of `x` [..., F] (leading dims matching `valid`) selected by `valid`, as [N, F] float64."""
    x = np.asarray(x, dtype=np.float64)
    if valid is None:
        return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    valid = np.asarray(valid, dtype=bool)
    return x[np.broadcast_to(valid, x.shape[:valid.ndim])].reshape(-1, x.shape[-1])


def tensor_metrics(ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """max_abs, max_rel, p999_abs and cosine of `got` against `ref` over the valid rows.

    `valid` is a bool array over the leading dims (e.g. [B, S] for [B, S, F] tensors); None keeps all.
    Non-finite values anywhere make every error metric inf and cosine -1, so NaNs never pass.
    """
    if np.shape(ref) != np.shape(got):
        raise ValueError(f"shape mismatch: reference {np.shape(ref)} vs candidate {np.shape(got)}")
    a, b = _valid(ref, valid), _valid(got, valid)
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "p999_abs": 0.0, "cosine": 1.0}
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "p999_abs": float("inf"), "cosine": -1.0}
    err = np.abs(a - b)
    scale = float(np.abs(a).max())
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = 1.0 if na == nb == 0.0 else float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else 0.0
    max_abs = float(err.max())
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        "p999_abs": float(np.percentile(err, 99.9)),
        "cosine": cosine,
    }


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_of_logprobs(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per position [...], in nats, of log-probabilities [..., V]."""
    # clamped: rounding can give -1e-17 for identical distributions
    return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per position [...], in nats."""
    return kl_of_logprobs(log_softmax(p_logits), log_softmax(q_logits))


def top1_agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Fraction of positions where argmax p == argmax q."""
    return float((np.argmax(p_logits, -1) == np.argmax(q_logits, -1)).mean())


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    k = min(k, x.shape[-1])
    return np.argpartition(-x, k - 1, axis=-1)[..., :k]


def logit_metrics(ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """Tensor metrics plus the next-token view: KL(P_ref || P_got), top-1 and top-5 agreement.

    ref, got: logits [..., vocab]; `valid` selects positions (leading dims). KL is in nats.
    """
    out = tensor_metrics(ref, got, valid)
    a, b = _valid(ref, valid), _valid(got, valid)
    if a.shape[0] == 0:
        return {**out, "kl_mean": 0.0, "kl_max": 0.0, "top1": 1.0, "top5": 1.0, "top1_in_top5": 1.0}
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return {**out, "kl_mean": float("inf"), "kl_max": float("inf"), "top1": 0.0, "top5": 0.0,
                "top1_in_top5": 0.0}
    kl = kl_divergence(a, b)
    k5a, k5b = _topk(a, 5), _topk(b, 5)
    overlap = (k5a[:, :, None] == k5b[:, None, :]).any(-1).sum(-1) / k5a.shape[-1]
    in5 = (k5b == a.argmax(-1)[:, None]).any(-1)
    return {**out, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": top1_agreement(a, b),
            "top5": float(overlap.mean()), "top1_in_top5": float(in5.mean())}


def merge(parts: list[dict[str, float]], weights: list[int] | None = None) -> dict[str, float]:
    """Worst case of per-step metrics (max errors, min similarities); means weighted by `weights`."""
    if not parts:
        return {}
    weights = weights or [1] * len(parts)
    total = sum(weights) or 1
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in ("cosine",):
            out[key] = min(values)
        elif key in ("top1", "top5", "top1_in_top5", "kl_mean"):
            out[key] = sum(v * w for v, w in zip(values, weights)) / total
        else:
            out[key] = max(values)
    return out


def first_divergence(ref: Any, got: Any) -> int | None:
    """The first index where two token sequences differ (a length difference counts), or None."""
    ref, got = list(ref), list(got)
    for i, (x, y) in enumerate(zip(ref, got)):
        if x != y:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))
