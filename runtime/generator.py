"""Text generation on an exported model folder: prefill, then one token a step through the KV cache.

    from edgellama.runtime import Generator
    gen = Generator("out/smollm2")                       # provider "auto": CUDA if it can start, else CPU
    print(gen.generate("What is ONNX?", chat=True, max_new_tokens=64).text)
    for piece in gen.stream("Tell me a story", chat=True, temperature=0.7, seed=1):
        print(piece, end="", flush=True)

Batches of prompts are left-padded, with position ids `cumsum(mask) - 1` (pads at 1), as
transformers' `generate` builds them, so each row generates what it would alone. A loaded
Generator serves concurrent calls from several threads: ONNX Runtime sessions are safe to run
concurrently and every call keeps its state (cache, random generator) to itself; a seed gives the
same tokens whatever runs beside it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgellama import contract
from edgellama.errors import ModelFolderError, RuntimeInputError
from edgellama.runtime import kv_loop
from edgellama.runtime.sampling import SamplingParams, next_tokens
from edgellama.runtime.session import OrtModel
from edgellama.runtime.textstream import TextStream

Prompt = str | Sequence[dict[str, str]]     # text, or chat messages [{"role": ..., "content": ...}]


@dataclasses.dataclass
class GenerationResult:
    """One sequence's output. `token_ids` are the new tokens (with the stop token when one ended it).

    `prefill_ms` is the prompt's forward pass plus the choice of the first token; `decode_tokens_per_s`
    counts the tokens after the first one over the time of their steps (per sequence in a batch).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str             # "stop" (a stop token) or "length" (max_new_tokens or the context)
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Generator:
    """Generation over one loaded model folder (see the module docstring)."""

    def __init__(self, model: str | Path | OrtModel, *, provider: str = "auto", threads: int | None = None,
                 strict: bool | None = None, loop: str | None = None, tokenizer: Any = None):
        self.model = model if isinstance(model, OrtModel) else OrtModel(model, provider=provider, threads=threads,
                                                                         strict=strict)
        self.config = self.model.config
        self.loop_mode = loop or kv_loop.default_mode(self.model)
        kv_loop.check_mode(self.model, self.loop_mode)   # a static-cache folder runs the static loop
        self._tokenizer = tokenizer
        stops = set(self.config.eos_token_ids)
        tok_eos = getattr(self.tokenizer_or_none, "eos_token_id", None)
        if isinstance(tok_eos, int):
            stops.add(tok_eos)
        self.stop_ids = frozenset(stops)
        pad = self.config.pad_token_id
        self.pad_id = pad if pad is not None else (min(stops) if stops else 0)

    # -- tokenizer ------------------------------------------------------------------------------------
    @property
    def tokenizer_or_none(self) -> Any:
        if self._tokenizer is None:
            from edgellama.tokenizer import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_folder(self.model.folder)
            except Exception:  # noqa: BLE001 - a folder without tokenizer files still runs token ids
                return None
        return self._tokenizer

    @property
    def tokenizer(self) -> Any:
        tok = self.tokenizer_or_none
        if tok is None:
            raise ModelFolderError(f"{self.model.folder}: no usable tokenizer (tokenizer.json); pass token ids")
        return tok

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with `chat`, through the folder's chat template (a generation prompt added)."""
        _check_text(prompt)
        tok = self.tokenizer
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if hasattr(tok, "chat_ids"):
                return list(tok.chat_ids(messages))
            return list(tok.encode(tok.apply_chat_template(messages)))
        return list(tok.encode(prompt))

    def decode(self, ids: Sequence[int]) -> str:
        tok = self.tokenizer_or_none
        if tok is None:
            return ""
        return tok.decode([int(i) for i in ids])

    # -- public calls -----------------------------------------------------------------------------------
    def generate(self, prompt: Prompt | list[Prompt], *, chat: bool = False, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: bool = True) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns one result) or a list of prompts (returns a list, one batch)."""
        many = isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], dict))
        prompts = prompt if many else [prompt]
        if not prompts:
            raise RuntimeInputError("no prompts given")
        ids = [self.encode(p, chat=chat) for p in prompts]
        results = self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop=stop)
        return results if many else results[0]

    def generate_ids(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop: bool = True) -> list[GenerationResult]:
        """Generate from token ids: one list of ids, or several (one left-padded batch). Always a list."""
        rows = _as_rows(prompt_ids)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        run = _Call(self, rows, params=params, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        for _ in run.steps():
            pass
        return run.results()

    def stream(self, prompt: Prompt, *, chat: bool = False, max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: bool = True,
               result: list | None = None) -> Iterator[str]:
        """Text pieces of one prompt's answer as they are generated (UTF-8 safe, stop token not shown).

        Pass `result=[]` to receive the GenerationResult appended to it when the stream ends.
        """
        ids = self.encode(prompt, chat=chat)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        run = _Call(self, [ids], params=params, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        text = TextStream(self.decode)
        for tokens in run.steps():
            token = int(tokens[0])
            if stop and token in self.stop_ids:
                break
            piece = text.push(token)
            if piece:
                yield piece
        tail = text.flush()
        if tail:
            yield tail
        if result is not None:
            result.extend(run.results())


def _check_text(prompt: Any) -> None:
    """A prompt is text: a str (or chat messages of str contents) that is valid Unicode. An argument
    or stdin read with surrogateescape carries its undecodable bytes as lone surrogates."""
    texts = [prompt] if isinstance(prompt, str) else None
    if texts is None:
        try:
            texts = [m["content"] for m in prompt]
        except (TypeError, KeyError, IndexError):
            raise RuntimeInputError("a prompt is text or a list of {'role', 'content'} messages") from None
    for text in texts:
        if not isinstance(text, str):
            raise RuntimeInputError(f"a prompt is text, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RuntimeInputError("the prompt is not valid UTF-8 text") from None


def _as_rows(prompt_ids: Any) -> list[list[int]]:
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise RuntimeInputError("empty prompt: give at least one token")
    rows = [list(r) for r in prompt_ids] if isinstance(prompt_ids[0], (list, tuple, np.ndarray)) else [prompt_ids]
    for r in rows:
        if not r:
            raise RuntimeInputError("empty prompt: give at least one token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in r):
            raise RuntimeInputError("token ids must be integers")
    return [[int(t) for t in r] for r in rows]


class _Call:
    """The state of one generate call; never shared between calls or threads."""

    def __init__(self, gen: Generator, rows: list[list[int]], *, params: SamplingParams, max_new_tokens: int,
                 seed: int | None, stop: bool):
        model = gen.model
        if not rows or not all(rows):
            raise RuntimeInputError("empty prompt: give at least one token")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise RuntimeInputError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        longest = max(len(r) for r in rows)
        if longest >= model.max_positions:
            raise RuntimeInputError(f"the prompt has {longest} tokens; the model's context is {model.max_positions} "
                                    "(prompt plus at least one new token must fit)")
        for r in rows:
            model.check_ids(np.asarray(r))
        self.gen, self.rows, self.params, self.stop = gen, rows, params, stop
        self.max_new = min(max_new_tokens, model.max_positions - longest)
        self.capped = self.max_new < max_new_tokens
        if seed is None and not params.greedy:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        self.seed = seed
        self.rng = None if params.greedy else np.random.default_rng(seed)
        self.new: list[list[int]] = [[] for _ in rows]
        self.done = [False] * len(rows)
        self.prefill_s = 0.0
        self.decode_s = 0.0

    def steps(self) -> Iterator[np.ndarray]:
        """Yield each step's chosen tokens [B] until every row stopped or the length cap is reached."""
        gen, model = self.gen, self.gen.model
        b = len(self.rows)
        ids, mask = contract.left_pad(self.rows, pad_id=gen.pad_id)
        pos = contract.positions_from_mask(mask)
        loop = kv_loop.make_loop(model, b, mode=gen.loop_mode, capacity=ids.shape[1] + self.max_new)
        start = time.perf_counter()
        with model.run_errors():
            tokens = next_tokens(loop.step(ids, mask, pos), self.params, self.rng)
        self.prefill_s = time.perf_counter() - start
        last_pos = pos[:, -1:]
        decode_start = None
        for step in range(self.max_new):
            for i, t in enumerate(tokens.tolist()):
                if not self.done[i]:
                    self.new[i].append(t)
                    self.done[i] = self.stop and t in gen.stop_ids
            yield tokens
            if all(self.done) or step == self.max_new - 1:
                break
            if decode_start is None:
                decode_start = time.perf_counter()   # decode time: the steps after the first token
            # Finished rows keep stepping (their tokens are ignored) so the batch stays rectangular.
            feed = np.where(self.done, gen.pad_id, tokens).astype(np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            last_pos = last_pos + 1
            with model.run_errors():
                tokens = next_tokens(loop.step(feed, mask, last_pos), self.params, self.rng)
            self.decode_s = time.perf_counter() - decode_start

    def results(self) -> list[GenerationResult]:
        out = []
        for row, new, done in zip(self.rows, self.new, self.done):
            shown = new[:-1] if (done and new) else new
            n_decode = max(len(new) - 1, 0)
            out.append(GenerationResult(
                text=self.gen.decode(shown), token_ids=list(new), prompt_tokens=len(row),
                finish_reason="stop" if done else "length", prefill_ms=self.prefill_s * 1e3,
                decode_ms=self.decode_s * 1e3,
                decode_tokens_per_s=(n_decode / self.decode_s) if self.decode_s > 0 and n_decode else 0.0,
                seed=self.seed))
        return out
