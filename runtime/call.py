"""One generation call: prefill, then one token a step, each token chosen by one pipeline.

    logits -> repetition penalty -> constraint mask -> sampling -> logprobs -> stop checks

(logprobs are read from the raw logits, before the penalty, the mask and the temperature, as vLLM
reports them by default.) A `Call` owns its state (cache loop, random generator, per-row text)
and is never shared between threads. It runs on a fresh loop, or on a loop it is given that
already holds `prefix` (batch 1): a chat session's cache, or speculative decoding's. A batch may
take one GenerationOptions per row that differ only in `PER_ROW` (max_new_tokens, stop, seed): each
row then has its own length cap, stop strings and random generator, so it generates what it would
alone (a server batching requests, serve/batcher.py); `drop(i)` ends one row early. `Stream`
turns a call into an iterator of text pieces whose `.result` can be read after the loop, after an
early `break`, or after `close()`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgellama import contract
from edgellama.errors import RuntimeInputError
from edgellama.runtime import kv_loop
from edgellama.runtime.options import GenerationOptions
from edgellama.runtime.sampling import TokenLogprob, next_tokens, repetition_penalty, token_logprobs
from edgellama.runtime.stopping import StopText, find_stop

FINISH_REASONS = ("stop", "length", "cancelled")
# Options that may differ between the rows of one batch: everything else is one pipeline for all rows.
PER_ROW = ("max_new_tokens", "stop", "seed", "defaults")


def shared_options(options: GenerationOptions) -> tuple:
    """The fields rows must agree on to share one call (hashable unless a constraint is given)."""
    return tuple(getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in PER_ROW)


class _LazyText:
    """GenerationResult.text: a str, or a function of no arguments in its place, called when the
    text is first read (a call that needed no text leaves decoding its tokens, and loading the
    tokenizer, to whoever reads it). repr, ==, to_dict, copies and pickles read the text."""

    def __get__(self, obj: Any, owner: Any = None) -> str:
        if obj is None:
            raise AttributeError("text")        # a dataclass field without a default
        value = obj.__dict__["_text"]
        if callable(value):
            value = obj.__dict__["_text"] = value()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_text"] = value


@dataclasses.dataclass
class GenerationResult:
    """One sequence's output.

    text                  the answer (without the stop token, and cut before a stop string)
    token_ids             the new tokens, with the token that ended it (EOS, or the one that
                          completed a stop string)
    prompt_tokens         the prompt's tokens (a chat turn: the whole conversation so far)
    prefill_tokens        tokens run through the prefill (a chat turn reusing its cache: fewer)
    finish_reason         "stop" (EOS, a stop string, a complete constraint), "length"
                          (max_new_tokens or the context), "cancelled" (a stream closed early)
    stop_reason           the EOS token id, or the stop string matched; None otherwise
    capped                how many tokens max_new_tokens was cut by to fit the context (0: none)
    logprobs              per new token (when asked): its logprob and the top-k (id, logprob)
    defaults              options taken from the folder's generation_config.json
    reused_tokens         a chat turn's cached tokens kept instead of prefilled again
    reprefill_reason      why a chat turn could not reuse all its cached tokens (None: it did)
    prefill_ms            the prefill forward pass plus the choice of the first token
    decode_tokens_per_s   the tokens after the first one over the time of their steps
    """

    text: str = _LazyText()     # type: ignore[assignment]
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    seed: int | None = None
    stop_reason: int | str | None = None
    prefill_tokens: int = 0
    capped: int = 0
    logprobs: list[TokenLogprob] | None = None
    defaults: list[str] = dataclasses.field(default_factory=list)
    reused_tokens: int = 0
    reprefill_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_text": self.text}   # the text, not the function that decodes it


class Call:
    """The state of one call on `gen` (a Generator): `rows` of new token ids, after `prefix` ids that
    `loop` already holds (a given loop: batch 1). `steps()` runs it; `results()` reads it."""

    def __init__(self, gen: Any, rows: list[list[int]], *, options: GenerationOptions | Sequence[GenerationOptions],
                 loop: Any = None, prefix: Sequence[int] = (), text: bool = False):
        model = gen.model
        if not rows or not all(rows):
            raise RuntimeInputError("empty prompt: give at least one token")
        per_row = not isinstance(options, GenerationOptions)
        row_options = list(options) if per_row else [options] * len(rows)
        if len(row_options) != len(rows) or not all(isinstance(o, GenerationOptions) for o in row_options):
            raise RuntimeInputError("options: one GenerationOptions, or one per row")
        options = row_options[0]
        if any(shared_options(o) != shared_options(options) for o in row_options):
            raise RuntimeInputError(f"the rows of one call may differ only in {', '.join(PER_ROW[:-1])}")
        prefix = [int(t) for t in prefix]
        if loop is not None and (len(rows) != 1 or loop.past_len != len(prefix)):
            raise RuntimeInputError("a call on a given cache takes one row, after the tokens the cache holds")
        longest = len(prefix) + max(len(r) for r in rows)
        if longest >= model.max_positions:
            raise RuntimeInputError(f"the prompt has {longest} tokens; the model's context is {model.max_positions} "
                                    "(prompt plus at least one new token must fit)")
        for r in rows:
            model.check_ids(np.asarray(r))
        self.gen, self.rows, self.options, self.loop, self.prefix = gen, rows, options, loop, prefix
        self.params = options.sampling
        self.row_options = row_options
        self.row_max = [min(o.max_new_tokens, model.max_positions - longest) for o in row_options]
        self.max_new = max(self.row_max)
        self.capped = options.max_new_tokens - self.row_max[0]
        self.seeds = [o.seed for o in row_options]
        if not self.params.greedy:
            fresh = [int(np.random.SeedSequence().entropy % (1 << 63)) for _ in (row_options if per_row else rows[:1])]
            self.seeds = [s if s is not None else fresh[i if per_row else 0] for i, s in enumerate(self.seeds)]
        self.seed = self.seeds[0]
        # Per-row options: one random generator per row, each drawing what the row alone would.
        self.rng = None if self.params.greedy else (
            [np.random.default_rng(s) for s in self.seeds] if per_row else np.random.default_rng(self.seed))
        self.stop_ids = gen.stop_ids if options.eos else frozenset()
        vocab = model.config.vocab_size
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros((len(rows), vocab), bool)
            for i, r in enumerate(rows):
                self.seen[i, prefix + r] = True
        self.constraints = [gen.constraint(options) for _ in rows] if options.constrained else None
        self.texts = ([StopText(gen.int_decoder(), o.stop) for o in row_options]
                      if (text or any(o.stop for o in row_options)) else None)
        self.pending = [""] * len(rows)      # released text not yet taken by a stream
        self.new: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[TokenLogprob]] | None = [[] for _ in rows] if options.logprobs is not None else None
        self.done = [False] * len(rows)
        self.stop_reason: list[int | str | None] = [None] * len(rows)
        self.cut: list[str | None] = [None] * len(rows)     # "length" / "cancelled": a row ended without a stop
        self.finished = False       # the loop ran to its end (not cancelled)
        self.reprefill_reason: str | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0

    # -- one token per row ------------------------------------------------------------------------
    def _choose(self, logits: np.ndarray) -> np.ndarray:
        raw = np.asarray(logits)
        x = raw
        if self.seen is not None:
            x = repetition_penalty(x, self.seen, self.options.repetition_penalty)
        if self.constraints is not None:
            x = np.array(x, dtype=np.float32, copy=True)
            for i, c in enumerate(self.constraints):
                if not self.done[i]:
                    x[i, ~c.allowed()] = -np.inf
        tokens = next_tokens(x, self.params, self.rng)
        if self.logprobs is not None:
            for i, lp in enumerate(token_logprobs(raw, tokens, self.options.logprobs)):
                if not self.done[i]:
                    self.logprobs[i].append(lp)
        return tokens

    def _record(self, i: int, t: int) -> None:
        """Row i chose token t: keep it, then the stop checks (EOS, constraint, stop strings)."""
        self.new[i].append(t)
        if self.seen is not None:
            self.seen[i, t] = True
        if t in self.stop_ids:
            self.done[i], self.stop_reason[i] = True, t
            return
        if self.constraints is not None:
            c = self.constraints[i]
            c.accept(t)
            if c.is_finished():
                self.done[i] = True
        if self.texts is not None:
            self.pending[i] += self.texts[i].push(t)
            if self.texts[i].match is not None:
                self.done[i], self.stop_reason[i] = True, self.texts[i].match

    def steps(self) -> Iterator[np.ndarray]:
        """Yield each step's chosen tokens [B] until every row stopped or the length cap is reached."""
        gen, model = self.gen, self.gen.model
        b = len(self.rows)
        if self.loop is None:
            ids, mask = contract.left_pad(self.rows, pad_id=gen.pad_id)
            pos = contract.positions_from_mask(mask)
            self.loop = kv_loop.make_loop(model, b, mode=gen.loop_mode, capacity=ids.shape[1] + self.max_new)
        else:
            ids = np.asarray(self.rows, np.int64)
            start = self.loop.past_len
            mask = np.ones((1, start + ids.shape[1]), np.int64)
            pos = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        loop = self.loop
        t0 = time.perf_counter()
        with model.run_errors():
            tokens = self._choose(loop.step(ids, mask, pos))
        self.prefill_s = time.perf_counter() - t0
        # A decode step does only what this call asks for: the loop's one-token step, the choice
        # (a bare argmax when greedy with nothing else to apply), and the stop checks it needs.
        advance = self._advance(loop, mask, pos)
        choose = self._chooser()
        plain = self.seen is None and self.constraints is None and self.texts is None
        done, new, row_max, stop_ids, pad_id = self.done, self.new, self.row_max, self.stop_ids, gen.pad_id
        decode_start = None
        for step in range(self.max_new):
            for i, t in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if plain:
                    new[i].append(t)
                    if t in stop_ids:
                        done[i], self.stop_reason[i] = True, t
                        continue
                else:
                    self._record(i, t)
                    if done[i]:
                        continue
                if len(new[i]) >= row_max[i]:
                    done[i], self.cut[i] = True, "length"
            yield tokens
            if all(done) or step == self.max_new - 1:
                break
            if decode_start is None:
                decode_start = time.perf_counter()   # decode time: the steps after the first token
            # Finished rows keep stepping (their tokens are ignored) so the batch stays rectangular.
            feed = np.where(done, pad_id, tokens) if True in done else tokens
            try:   # not model.run_errors(): entering a context manager costs more than a step's bookkeeping
                tokens = choose(advance(feed))
            except Exception as e:
                model.reraise(e)
            self.decode_s = time.perf_counter() - decode_start
        self.finished = True

    def _chooser(self) -> Callable[[np.ndarray], np.ndarray]:
        """The token choice of a decode step: the whole pipeline (`_choose`) when the call has a
        penalty, a constraint or logprobs, else the sampling alone."""
        if self.seen is not None or self.constraints is not None or self.logprobs is not None:
            return self._choose
        params, rng = self.params, self.rng
        return lambda logits: next_tokens(logits, params, rng)

    def _advance(self, loop: Any, mask: np.ndarray, pos: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """tokens [B] -> the logits [B, V] after them: the static loop's own one-token step, or `loop.step`
        with the mask (one column more each step, from a buffer filled once) and positions it needs."""
        if isinstance(loop, kv_loop.StaticLoop):
            return loop.advance
        width = mask.shape[1]
        full = np.ones((mask.shape[0], width + self.max_new), np.int64)
        full[:, :width] = mask
        last = pos[:, -1:]

        def advance(tokens: np.ndarray) -> np.ndarray:
            nonlocal width, last
            width += 1
            last = last + 1
            return loop.step(tokens[:, None], full[:, :width], last)

        return advance

    def drop(self, i: int) -> None:
        """End row i now (its reader left): its tokens are no longer recorded, its finish is "cancelled",
        and the call ends once every row has."""
        if not self.done[i]:
            self.done[i], self.cut[i] = True, "cancelled"

    # -- reading it ---------------------------------------------------------------------------------
    def take_text(self, i: int, *, final: bool = False) -> str:
        """Row i's text released since the last take (with `final`, the rest as well)."""
        if final and self.texts is not None:
            self.pending[i] += self.texts[i].flush()
        out, self.pending[i] = self.pending[i], ""
        return out

    def fed_ids(self) -> list[int]:
        """Row 0's tokens whose keys and values the loop holds (the last chosen token is not fed)."""
        held = 0 if self.loop is None else self.loop.past_len
        return (self.prefix + self.rows[0] + self.new[0])[:held]

    def _text(self, i: int) -> str | Callable[[], str]:
        """Row i's text; a call that decoded no text gives the function that decodes it (read
        when the result's `.text` is, so that token ids in and out never load the tokenizer)."""
        new, reason = self.new[i], self.stop_reason[i]
        if isinstance(reason, str):
            full = self.gen.decode(new)
            hit = find_stop(full, [reason])
            return full[:hit[0]] if hit else self.texts[i].text[:self.texts[i].cut]
        ids = new[:-1] if isinstance(reason, int) else list(new)
        if self.texts is None:
            return functools.partial(self.gen.decoder(), ids)
        return self.gen.decode(ids)

    def results(self) -> list[GenerationResult]:
        return [self.result(i) for i in range(len(self.rows))]

    def result(self, i: int) -> GenerationResult:
        """Row i's result (readable as soon as the row is done, while the others go on)."""
        row, new = self.rows[i], self.new[i]
        n_decode = max(len(new) - 1, 0)
        finish = self.cut[i] or ("stop" if self.done[i] else ("length" if self.finished else "cancelled"))
        opts = self.row_options[i]
        return GenerationResult(
            text=self._text(i), token_ids=list(new), prompt_tokens=len(self.prefix) + len(row),
            finish_reason=finish, prefill_ms=self.prefill_s * 1e3, decode_ms=self.decode_s * 1e3,
            decode_tokens_per_s=(n_decode / self.decode_s) if self.decode_s > 0 and n_decode else 0.0,
            seed=self.seeds[i], stop_reason=self.stop_reason[i],
            prefill_tokens=len(row), capped=opts.max_new_tokens - self.row_max[i],
            logprobs=None if self.logprobs is None else list(self.logprobs[i]),
            defaults=list(opts.defaults), reused_tokens=len(self.prefix), reprefill_reason=self.reprefill_reason)


class Stream:
    """Text pieces of one call's answer as they are generated (UTF-8 safe; the stop token and stop
    strings never shown; text that may still become a stop string held back until it cannot).

        s = gen.stream("Tell me a story", max_new_tokens=64)
        for piece in s:
            print(piece, end="")
        print(s.result.finish_reason)

    `result` is there once the loop ends; read after an early `break` (or `close()`), it closes
    the call and reports the tokens so far with finish_reason "cancelled". `on_close(result, error)` runs
    once, when the call ends either way (`error`: the exception that ended it, else None)."""

    def __init__(self, call: Call, *,
                 on_close: Callable[[GenerationResult, BaseException | None], None] | None = None):
        self.call = call
        self._on_close = on_close
        self._result: GenerationResult | None = None
        self._pieces = self._run()

    def _run(self) -> Iterator[str]:
        try:
            for _ in self.call.steps():
                piece = self.call.take_text(0)
                if piece:
                    yield piece
            tail = self.call.take_text(0, final=True)
            if tail:
                yield tail
        except GeneratorExit:
            raise
        except BaseException as e:   # an interrupt too: the cache may be half-updated
            self._close(error=e)
            raise
        finally:
            self._close()

    def _close(self, *, error: BaseException | None = None) -> None:
        if self._result is None:
            self._result = self.call.results()[0]
            if self._on_close is not None:
                self._on_close(self._result, error)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """End the call now (idempotent); `result` then holds what was generated."""
        self._pieces.close()
        self._close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            self.close()
        return self._result
