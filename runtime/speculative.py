"""Exact speculative decoding for one prompt (batch 1) on the static KV cache.

    gen.generate("Repeat this: ...", speculative="prompt-lookup")   # or a draft folder / Generator

A `SpeculativeLoop` has the interface of the KV loops (runtime/kv_loop.py: `step`, `past_len`,
`rewind`), so the call's own token pipeline (call.py: penalty, constraint mask, sampling, logprobs,
stop checks) chooses every token exactly as it does without speculation. Behind that interface:

  - after a token t is chosen, a drafter proposes the next tokens d1..dk: prompt lookup (the longest
    recent n-gram of the context, n = max_ngram..min_ngram, that occurred earlier: the tokens that
    followed it) or a draft model's greedy continuation (its own StaticCache kept in step);
  - ONE forward pass verifies them: `StaticCache.append([t, d1..dk], keep=k+1)` returns the logits
    after t, d1, ..., dk;
  - the loop hands back the logits after t; while the call then chooses d1, d2, ... it hands back
    the logits it already has (no forward pass); at the first choice that differs from the draft it
    rewinds the cache past the rejected draft tokens (`StaticCache.rewind`) and goes on from there.

Why this is exact. Every token is chosen by the call from the logits of the true prefix: a draft
token's logits are used only when every token before it was chosen equal to the draft. Greedy
therefore picks the same tokens as plain greedy. With sampling, the drafter is deterministic (prompt
lookup; a draft model drafts greedily), so its distribution q is a point mass on d; the standard
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)) = p(d), on rejection sample
from normalize(max(p - q, 0)) = p with d removed) gives exactly the token distribution of sampling
t ~ p and accepting iff t == d, which is what happens here, with the call's own random draws: a seed
gives the same tokens with or without speculation. The one difference is numerical: logits of a
multi-token pass may differ from a one-token step in the last bits (a different matrix-product
blocking), so a near-exact tie between two tokens could break the other way.

When it does not pay it switches itself off (`Switch`): a round (draft + verify of k tokens) costs
r(k) = 1 + beta*k one-token steps, measured as it runs; it yields 1 + a tokens, a the running mean
of accepted draft tokens. Drafting stays on while a > beta*k; off, plain steps run for a cool-down
that doubles each time a probe fails again. The draft length follows a (a + 2, at most num_draft).
"""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgellama.errors import RuntimeInputError
from edgellama.runtime.session import OrtModel
from edgellama.runtime.static_loop import StaticCache

PROMPT_LOOKUP = "prompt-lookup"
NUM_DRAFT = 8
PROBE = 3


# -- drafters ---------------------------------------------------------------------------------------
class PromptLookup:
    """Draft by copying: the tokens that followed the most recent earlier occurrence of the context's
    last n tokens, for the longest n from `max_ngram` down to `min_ngram` that occurred (k of them,
    the copy running on into its own output when the occurrence is less than k tokens back)."""

    name = PROMPT_LOOKUP

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise RuntimeInputError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ids = np.asarray(context, np.int64)
        n_ctx = len(ids)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            # Windows starting at 0..n_ctx-n-1: each has at least one token after it.
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[n_ctx - n:]).all(axis=1))
            if len(hits):
                # Copy from `dist` tokens back, the copy reading its own output where it overlaps
                # the end (as LZ77 does): a run "abab" continues "abab...", not one token.
                dist = n_ctx - (int(hits[-1]) + n)
                out = ids[n_ctx - dist:n_ctx - dist + k].tolist()
                while len(out) < k:
                    out.append(out[len(out) - dist])
                return out
        return []

    def sync(self, context: Sequence[int]) -> None:
        """Nothing to keep in step (a draft model's cache is)."""


class DraftModel:
    """Draft with another export of the model (same vocabulary): its greedy continuation, on its own
    StaticCache, rewound to what it shares with the target's context before each proposal."""

    def __init__(self, draft: Any, *, target: OrtModel, target_tokenizer: Any = None, capacity: int):
        from edgellama.runtime.generator import Generator

        gen = draft if isinstance(draft, Generator) else Generator(draft, provider=target.provider)
        check_same_vocabulary(gen, target=target, target_tokenizer=target_tokenizer)
        self.model = gen.model
        self.name = f"draft model {self.model.folder}"
        self.cache = StaticCache(self.model, 1, min(capacity, self.model.max_positions))
        self.fed: list[int] = []

    def sync(self, context: Sequence[int]) -> None:
        """Rewind to the longest prefix shared with `context`, keeping at least one token to feed."""
        shared = 0
        limit = min(len(self.fed), len(context) - 1)
        while shared < limit and self.fed[shared] == context[shared]:
            shared += 1
        if shared < len(self.fed):
            self.cache.rewind(len(self.fed) - shared)
            del self.fed[shared:]

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        room = self.model.max_positions - len(context)
        k = min(k, room)
        if k < 1:
            return []
        self.sync(context)
        new = list(context[len(self.fed):])
        logits = self.cache.append([new])[0, -1]
        self.fed += new
        out = [int(logits.argmax())]
        while len(out) < k:
            logits = self.cache.step(np.array(out[-1:], np.int64))[0]
            self.fed.append(out[-1])
            out.append(int(logits.argmax()))
        return out


def check_same_vocabulary(draft: Any, *, target: OrtModel, target_tokenizer: Any = None) -> None:
    """RuntimeInputError unless the draft Generator's vocabulary is the target's (size and tokens)."""
    a, b = draft.model.config.vocab_size, target.config.vocab_size
    if a != b:
        raise RuntimeInputError(f"the draft model's vocabulary ({a} tokens, {draft.model.folder}) differs from the "
                                f"model's ({b} tokens, {target.folder})")
    tok = draft.tokenizer_or_none
    if tok is not None and target_tokenizer is not None:
        if tok.backend.get_vocab(with_added_tokens=True) != target_tokenizer.backend.get_vocab(with_added_tokens=True):
            raise RuntimeInputError(f"the draft model's vocabulary ({draft.model.folder}) differs from the model's "
                                    f"({target.folder}): the same size, other tokens")


# -- when to draft ----------------------------------------------------------------------------------
class Switch:
    """Whether a round of drafting pays and how many tokens to draft, from what rounds and plain
    steps cost as they run.

    Costs are in one-token steps: a round drafting k tokens costs 1 + beta*k (beta: one more token in
    the verify pass, drafting included; `beta` until a round is measured, then the median of the
    recent rounds' against the median recent plain step) and yields 1 + a tokens (a: the running mean of draft tokens accepted
    per round). A round pays when a > beta*k. The next round drafts a + 2 tokens (at most
    `num_draft`; PROBE when a is not known yet): longer while drafts are accepted whole, shorter when
    they are not. When a round
    does not pay, plain steps run for a cool-down (doubled each time the next probe fails too)."""

    def __init__(self, *, num_draft: int = NUM_DRAFT, beta: float = 0.1, alpha: float = 0.3, cooldown: int = 16,
                 max_cooldown: int = 512, window: int = 15):
        self.num_draft, self.prior_beta, self.alpha = num_draft, beta, alpha
        self.accepted: float | None = None
        # Medians of the last `window` measurements: a step or a round slowed down by something else
        # running on the machine moves them little.
        self.step_times: collections.deque[float] = collections.deque(maxlen=window)
        self.betas: collections.deque[float] = collections.deque(maxlen=window)
        self.first_cooldown, self.max_cooldown = cooldown, max_cooldown
        self.cooldown = cooldown
        self.off_for = 0          # plain steps left before the next probe

    @property
    def beta(self) -> float:
        return statistics.median(self.betas) if self.betas else self.prior_beta

    @property
    def step_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    def length(self, room: int) -> int:
        """Tokens to draft now (0: a plain step), at most `room`."""
        if self.step_s is None:       # a plain step first: what the rounds are measured against
            return 0
        if self.off_for > 0:
            self.off_for -= 1
            return 0
        # A first round or a probe drafts PROBE tokens: cheap when nothing is accepted, and a draft
        # accepted whole grows by two tokens a round.
        k = PROBE if self.accepted is None else int(self.accepted) + 2
        return max(0, min(k, self.num_draft, room))

    def pays(self, k: int) -> bool:
        return self.accepted is None or self.accepted > self.beta * k

    def plain_step(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def round(self, *, drafted: int, accepted: int, seconds: float) -> None:
        a = self.alpha
        self.accepted = accepted if self.accepted is None else (1 - a) * self.accepted + a * accepted
        step = self.step_s
        if step is not None and drafted:
            self.betas.append(max(0.0, (seconds / step - 1) / drafted))
        if self.pays(drafted):
            self.cooldown = self.first_cooldown
        else:
            self.off_for, self.cooldown = self.cooldown, min(2 * self.cooldown, self.max_cooldown)
            self.accepted = None     # the next probe starts afresh


# -- the loop ---------------------------------------------------------------------------------------
class SpeculativeLoop:
    """kv_loop's loop interface over a StaticCache, drafting and verifying behind `step` (batch 1)."""

    def __init__(self, model: OrtModel, *, drafter: Any, capacity: int, num_draft: int = NUM_DRAFT,
                 switch: Switch | None = None):
        if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
            raise RuntimeInputError(f"num_draft must be a positive integer, got {num_draft!r}")
        self.model, self.batch = model, 1
        self.drafter, self.num_draft = drafter, num_draft
        self.switch = switch or Switch(num_draft=num_draft)
        self.end = capacity                      # prompt + max_new_tokens: no draft past it
        self.cache = StaticCache(model, 1, min(capacity + num_draft, model.max_positions))
        if not self.cache.keeps:
            raise RuntimeInputError(f"speculative decoding verifies several positions in one pass; {model.folder} "
                                    "returns only the last position's logits (export it again for logits_to_keep)")
        self.context: list[int] = []             # the tokens fed, as the call sees them
        self._pending: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._round: dict[str, Any] | None = None
        self.forwards = 0                        # forward passes of the model (drafts not counted)
        self.rounds = 0
        self.drafted = 0
        self.accepted = 0

    @property
    def past_len(self) -> int:
        return len(self.context)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """The logits [1, V] after `input_ids` [1, S], as a KV loop returns them."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise RuntimeInputError("speculative decoding runs one prompt (batch 1)")
        if np.asarray(attention_mask).shape[1] != self.past_len + ids.shape[1]:
            raise RuntimeInputError("attention_mask must cover past + new tokens")
        new = [int(t) for t in ids[0]]
        if len(new) == 1 and self._pending and self._pending[0][0] == new[0]:
            token, logits = self._pending.popleft()
            self.context.append(token)
            self._round["accepted"] += 1
            if not self._pending:
                self._close_round()
            return logits[None]
        self._drop_pending()
        first = not self.context
        self.context += new
        if len(new) > 1 or first:
            self.forwards += 1
            return self.cache.append([new])[:, -1]
        return self._decode(new[0])

    def _decode(self, token: int) -> np.ndarray:
        # No draft past the call's last token, nor past the context.
        room = min(self.end - len(self.context) - 1, self.model.max_positions - len(self.context))
        k = self.switch.length(room)
        draft: list[int] = []
        t0 = time.perf_counter()
        if k > 0:
            draft = self.drafter.propose(self.context, k)[:k]
        self.forwards += 1
        if not draft:
            logits = self.cache.step(np.array([token], np.int64)).copy()
            self.switch.plain_step(time.perf_counter() - t0)
            return logits
        out = self.cache.append([[token, *draft]], keep=len(draft) + 1)[0]
        self._pending.extend(zip(draft, out[1:]))
        self._round = {"drafted": len(draft), "accepted": 0, "seconds": time.perf_counter() - t0}
        self.rounds += 1
        self.drafted += len(draft)
        return out[:1]

    def _close_round(self) -> None:
        if self._round is not None:
            self.accepted += self._round["accepted"]
            self.switch.round(**self._round)
            self._round = None

    def _drop_pending(self) -> None:
        """Rewind the cache past draft tokens that were not chosen."""
        if self._pending:
            self.cache.rewind(len(self._pending))
            self._pending.clear()
        self._close_round()

    def rewind(self, n: int) -> None:
        """Forget the last `n` tokens the call fed (a chat session going back)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= self.past_len:
            raise RuntimeInputError(f"cannot rewind {n!r} tokens: the cache holds {self.past_len}")
        self._drop_pending()
        if n:
            self.cache.rewind(int(n))
            del self.context[len(self.context) - int(n):]
        self.drafter.sync(self.context)

    def stats(self) -> dict[str, int]:
        return {"forwards": self.forwards, "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted}


# -- what a Generator call builds -------------------------------------------------------------------
def make_loop(gen: Any, speculative: Any, *, rows: list[list[int]], options: Any) -> SpeculativeLoop | None:
    """The loop of one Generator call with `speculative` = "prompt-lookup", a draft model folder or a
    Generator, or a drafter object (`propose(context, k)`, `sync(context)`); None: no speculation."""
    if speculative is None:
        return None
    from edgellama.runtime.generator import Generator

    model = gen.model
    max_new_tokens = options.max_new_tokens
    if len(rows) != 1:
        raise RuntimeInputError("speculative decoding runs one prompt (batch 1); give one prompt or "
                                "speculative=None")
    if model.kv_cache != "static":
        raise RuntimeInputError(f"speculative decoding needs the static KV cache contract; {model.folder} has the "
                                "dynamic one (export it with --kv-cache static)")
    capacity = min(len(rows[0]) + max_new_tokens, model.max_positions)
    if isinstance(speculative, str) and speculative == PROMPT_LOOKUP:
        drafter: Any = PromptLookup()
    elif hasattr(speculative, "propose") and hasattr(speculative, "sync"):
        drafter = speculative
    elif isinstance(speculative, (str, Path, Generator)):
        drafter = DraftModel(speculative, target=model, target_tokenizer=gen.tokenizer_or_none, capacity=capacity)
    else:
        raise RuntimeInputError(f"speculative takes None, {PROMPT_LOOKUP!r}, a draft model folder or a Generator; "
                                f"got {speculative!r}")
    return SpeculativeLoop(model, drafter=drafter, capacity=capacity)
