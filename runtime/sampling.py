"""Next-token choice from last-position logits: greedy, or temperature / top-k / top-p sampling.

The filters match transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and
`TopPLogitsWarper` (applied in that order, as `generate` does): top-k keeps every token whose
logit ties the k-th largest; top-p drops the low tail whose cumulative probability is at most
1 - top_p and always keeps the most likely token. The draw itself uses a caller-owned
`numpy.random.Generator`, so one seed gives one result whatever else runs in the process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgellama.errors import RuntimeInputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise RuntimeInputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise RuntimeInputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise RuntimeInputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p on [B, V] logits; removed tokens become -inf (float64)."""
    src = np.asarray(logits)
    x = np.array(src, dtype=np.float64)     # our own copy: every step below writes in place
    if params.temperature not in (0, 1):
        x /= params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = np.partition(x, vocab - params.top_k, axis=-1)[:, vocab - params.top_k][:, None]
        x[x < kth] = -np.inf
    if params.top_p < 1.0:
        # Dividing float32 logits by a temperature in float64 keeps their order and their ties (no
        # overflow nor underflow to a denormal within these bounds), so the float32 logits sort as
        # `vals` do, on stable_argsort's fast path.
        narrow = src.dtype in (np.float32, np.float16) and src.ndim == 2 and 1e-200 < params.temperature < 1e200
        for r, row in enumerate(x):
            keep = np.flatnonzero(np.isfinite(row))
            vals = row[keep]
            order = stable_argsort(src[r, keep] if narrow else vals)   # ascending, as transformers sorts
            probs = _softmax(vals[order])
            remove = np.cumsum(probs) <= 1 - params.top_p
            remove[-1] = False                                      # min_tokens_to_keep = 1
            row[keep[order[remove]]] = -np.inf
    return x


def stable_argsort(values: np.ndarray) -> np.ndarray:
    """`np.argsort(values, kind="stable")` of a 1-D array without NaN. Float32 (or float16) values take
    one vectorized integer sort instead of numpy's stable sort of floats (a timsort, several times
    slower on a vocabulary): each value's bits mapped to an integer of the same order (-0.0 and 0.0
    equal), its index in the low 32 bits, so the keys are unique and ties fall in index order."""
    v = np.asarray(values)
    if v.dtype == np.float16:
        v = v.astype(np.float32)
    if v.dtype != np.float32 or v.ndim != 1 or v.size >= 1 << 32:
        return np.argsort(v, kind="stable")
    bits = v.view(np.int32).astype(np.int64)
    order = np.where(bits < 0, np.int64(-(1 << 31)) - bits, bits)    # negative floats: reversed bits
    keys = (order << 32) | np.arange(v.size, dtype=np.int64)
    return np.sort(keys) & 0xFFFFFFFF


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def next_tokens(logits: np.ndarray, params: SamplingParams,
                rng: np.random.Generator | list[np.random.Generator] | None) -> np.ndarray:
    """One token id per row of [B, V] logits (int64 [B]); `rng` one generator, or one per row (each row
    then draws what it would alone)."""
    logits = np.asarray(logits)
    if params.greedy:
        return logits.argmax(axis=-1).astype(np.int64)     # first maximum, as torch.argmax
    if rng is None:
        raise RuntimeInputError("sampling needs a random generator (pass a seed)")
    # The softmax in place on filter_logits' fresh array: the same operations as _softmax, one
    # vocabulary-sized allocation instead of four.
    probs = filter_logits(logits, params)
    probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    draws = np.array([r.random() for r in rng]) if isinstance(rng, list) else rng.random(len(probs))
    u = draws * cdf[:, -1]
    # Inverse-CDF draw: the first token whose cumulative probability exceeds u (never a removed token,
    # whose probability is exactly 0 and so never moves the CDF).
    ids = np.array([np.searchsorted(row, ui, side="right") for row, ui in zip(cdf, u)], dtype=np.int64)
    return np.minimum(ids, logits.shape[-1] - 1)


# -- the other steps of a token's choice --------------------------------------------------------------
def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' `RepetitionPenaltyLogitsProcessor` on [B, V] logits: every token id a row has
    seen (its prompt and what it generated; `seen` [B, V] bool) has its logit multiplied by
    `penalty` when negative, divided by it otherwise (once, however often it occurred)."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return x
    hit = x[seen]
    x[seen] = np.where(hit < 0, hit * np.float32(penalty), hit / np.float32(penalty))
    return x


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's log-probability and the `k` most likely tokens of its step (id, logprob),
    most likely first (ties: the lower id first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, k: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of [B, V] logits for the chosen `tokens` [B]."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[-1])
    out = []
    for row, t in zip(lp, np.asarray(tokens).tolist()):
        order = np.argsort(-row, kind="stable")[:k]
        out.append(TokenLogprob(int(t), float(row[t]), [(int(i), float(row[i])) for i in order]))
    return out
