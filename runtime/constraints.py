"""Constrained output: a JSON schema, a regular expression or a Lark grammar as a token mask per step.

llguidance (the library onnxruntime-genai uses for guidance) does the matching: `LLTokenizer` is
built from the folder's tokenizer.json text (the same Rust `tokenizers` model edgellama encodes
with, so token bytes agree), `LLMatcher` walks the grammar token by token.

    c = build_constraint(tokenizer=tok, vocab_size=logits.shape[-1], eos_ids=[eos], json_schema=schema)
    logits[~c.allowed()] = -np.inf; token = sample(logits); c.accept(token)

`accept` starts computing the next mask on a worker thread (llguidance releases the GIL), so in a
loop that accepts a token and then runs the model on it the mask is ready when `allowed` is called.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from edgellama.errors import RuntimeInputError

# Lines llguidance adds to point at its generated Lark text (`   1 | start: /[a-/` and `^`): they
# name a grammar the user never wrote, so the one-line reason keeps only the messages.
_ECHO = re.compile(r"^\s*(\d+\s*\|.*|\^+)\s*$")

# JSON as json.dumps writes it. llguidance's default (any run of whitespace between tokens) lets a
# weak or sampled model emit newlines forever without leaving the schema; a schema's own
# "x-guidance" options still override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Workers shared by every constraint (a thread per request would cost more than a mask); one
# constraint never has two masks in flight, since each of its methods first waits for the last.
_POOL: ThreadPoolExecutor | None = None

# LLTokenizer construction walks the whole vocabulary; a Generator builds a constraint per request
# on the same tokenizer, so the llguidance tokenizer is kept per (tokenizer, width, eos ids).
_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = {}
_KEEP_TOKENIZERS = 4


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edgellama-mask")
    return _POOL


def one_line(message: str) -> str:
    """llguidance's multi-line reason as one line (without the parser state dump it may append)."""
    message = str(message).split("<state>", 1)[0]
    kept = [line.strip() for line in message.splitlines() if line.strip() and not _ECHO.match(line)]
    return " ".join(kept) or "no reason given"


class TokenConstraint:
    """The tokens a grammar allows next, advanced token by token; `rollback` undoes accepted tokens."""

    def __init__(self, matcher: Any, *, tokenizer: Any, grammar: str, vocab_size: int, what: str):
        self._matcher = matcher
        self._tokenizer, self._grammar = tokenizer, grammar   # to rebuild the matcher after an error
        self.vocab_size = vocab_size
        self.what = what                       # "JSON schema", "regex", "grammar": for messages
        self._words = (tokenizer.vocab_size + 31) // 32   # int32 words of llguidance's bitmask
        self._tokens: list[int] = []
        self._state()
        self._pending: Future | None = None
        self._mask: np.ndarray | None = None   # the current state's mask, until the next accept/rollback

    # -- the mask -----------------------------------------------------------------------------------
    def _compute(self) -> np.ndarray:
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self._words * 32)
        fill_next_token_bitmask(self._matcher, bits)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        return allowed

    def _prefetch(self) -> None:
        self._mask = None
        self._pending = _pool().submit(self._compute)

    def _settle(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._mask = pending.result()

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens the grammar allows next. A fresh array each call."""
        self._settle()
        if self._mask is None:
            self._mask = self._compute()
        if self._matcher.is_error():
            # llguidance reports a mask with no token as an error state it never leaves; the matcher
            # is rebuilt at the same tokens so that a rollback can still take the caller elsewhere.
            reason = self._matcher.get_error()
            self._revive()
            if reason.startswith("NoExtension"):
                raise RuntimeInputError(self._nothing_allowed())
            raise RuntimeInputError(f"the {self.what} constraint failed: {one_line(reason)}")
        if not self._mask.any():
            raise RuntimeInputError(self._nothing_allowed())
        return self._mask.copy()

    def _state(self) -> None:
        # Read while no mask is in flight: the worker holds the matcher during a computation, and
        # a generation loop asks is_finished() right after accept(), before the forward pass.
        self._stopped, self._accepting = bool(self._matcher.is_stopped()), bool(self._matcher.is_accepting())

    def _nothing_allowed(self) -> str:
        return (f"the {self.what} constraint allows no token of this model's vocabulary after "
                f"{len(self._tokens)} tokens; nothing that matches it can be generated")

    def _revive(self) -> None:
        import llguidance

        self._mask = None
        self._matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if self._tokens and not self._matcher.consume_tokens(self._tokens):
            raise RuntimeInputError(f"the {self.what} constraint failed: {one_line(self._matcher.get_error())}")
        self._state()

    # -- moving -------------------------------------------------------------------------------------
    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; a token the grammar does not allow is refused and changes nothing."""
        self._settle()
        token = int(token_id)
        if self._mask is not None:
            ok = 0 <= token < self.vocab_size and bool(self._mask[token])
        else:
            # validate_tokens only looks ahead: a refused token leaves the matcher usable, whereas a
            # failed consume_token puts it in an error state it never leaves.
            ok = 0 <= token < self.vocab_size and self._matcher.validate_tokens([token]) == 1
        if not ok:
            raise RuntimeInputError(f"token {token} is not allowed by the {self.what} constraint here "
                                    f"(after {len(self._tokens)} tokens)")
        if not self._matcher.consume_token(token):
            reason = self._matcher.get_error()
            self._revive()
            raise RuntimeInputError(f"the {self.what} constraint failed: {one_line(reason)}")
        self._tokens.append(token)
        self._state()
        if self._stopped:
            self._mask = None      # only EOS is left: computed if asked for
        else:
            self._prefetch()

    def is_finished(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence can follow (or EOS was accepted)."""
        return self._stopped

    def is_accepting(self) -> bool:
        """What was accepted so far is a complete match (generation may stop here)."""
        return self._accepting

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens."""
        self._settle()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise RuntimeInputError(f"rollback takes a token count >= 0, got {n!r}")
        if n > len(self._tokens):
            raise RuntimeInputError(f"cannot roll back {n} tokens: the constraint has accepted {len(self._tokens)}")
        if n == 0:
            return
        self._mask = None
        del self._tokens[len(self._tokens) - int(n):]
        if self._matcher.rollback(int(n)):
            self._state()
        else:
            self._revive()

    @property
    def accepted(self) -> int:
        """How many tokens were accepted (and not rolled back)."""
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"TokenConstraint({self.what}, accepted={len(self._tokens)}, finished={self.is_finished()})"


def build_constraint(*, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int] | None,
                     json_schema: dict | str | None = None, regex: str | None = None,
                     grammar: str | None = None) -> TokenConstraint:
    """A TokenConstraint for exactly one of `json_schema` (a dict or JSON text), `regex`, `grammar` (Lark).

    `tokenizer` is edgellama's Tokenizer; `vocab_size` is the model's logits width (ids past the
    tokenizer's vocabulary are never allowed); `eos_ids` are the ids that end generation (the
    tokenizer's EOS when empty).
    """
    import llguidance

    given = {name: value for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if value is not None}
    if len(given) != 1:
        raise RuntimeInputError("give exactly one of json_schema, regex or grammar"
                                + (f" (got {', '.join(given)})" if given else ""))
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise RuntimeInputError(f"vocab_size must be a positive int, got {vocab_size!r}")
    (kind, value), = given.items()
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
    text = _grammar_text(llguidance, kind, value)
    lltok = _lltokenizer(llguidance, tokenizer, vocab_size=int(vocab_size), eos_ids=eos_ids)
    matcher = llguidance.LLMatcher(lltok, text, log_level=0)
    if matcher.is_error():
        raise RuntimeInputError(f"invalid {what}: {one_line(matcher.get_error())}")
    return TokenConstraint(matcher, tokenizer=lltok, grammar=text, vocab_size=int(vocab_size), what=what)


def _grammar_text(llguidance: Any, kind: str, value: Any) -> str:
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RuntimeInputError(f"invalid JSON schema: not JSON ({e})") from None
        if not isinstance(value, (dict, bool)):
            raise RuntimeInputError(f"invalid JSON schema: a schema is a JSON object, got {type(value).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise RuntimeInputError(f"invalid JSON schema: {one_line(str(e))}") from None
    if not isinstance(value, str) or not value:
        raise RuntimeInputError(f"the {kind} must be non-empty text, got {value!r}")
    return llguidance.grammar_from("regex" if kind == "regex" else "lark", value)


def _lltokenizer(llguidance: Any, tokenizer: Any, *, vocab_size: int, eos_ids: Iterable[int] | None) -> Any:
    eos = sorted({int(i) for i in (eos_ids or ())})
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = [int(tokenizer.eos_token_id)]
    if not eos:
        raise RuntimeInputError("a constraint needs an end-of-sequence token id (eos_ids), and the tokenizer has none")
    backend = getattr(tokenizer, "backend", tokenizer)
    if not hasattr(backend, "to_str"):
        raise RuntimeInputError(f"constraints need a `tokenizers` tokenizer, got {type(tokenizer).__name__}")
    # The mask covers both widths: the tokenizer's ids (llguidance refuses fewer) and the model's
    # logits, whose extra rows no text reaches.
    width = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    key = (id(backend), width, tuple(eos))   # the entry holds `backend`, so its id is not reused meanwhile
    cached = _TOKENIZERS.get(key)
    if cached is None:
        if eos[-1] >= width:
            raise RuntimeInputError(f"eos id {eos[-1]} is outside the vocabulary ({width} ids)")
        try:
            lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=width, eos_token=eos)
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain ValueError/RuntimeError
            raise RuntimeInputError(f"llguidance cannot read this tokenizer: {one_line(str(e))}") from None
        cached = _TOKENIZERS[key] = (backend, lltok)
        while len(_TOKENIZERS) > _KEEP_TOKENIZERS:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    return cached[1]
