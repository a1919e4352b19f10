"""Text generation on an exported model folder: prefill, then one token a step through the KV cache.

    from edgellama.runtime import Generator
    gen = Generator("out/smollm2")                       # provider "auto": CUDA if it can start, else CPU
    print(gen.generate("What is ONNX?", chat=True, max_new_tokens=64).text)
    stream = gen.stream("Tell me a story", chat=True, temperature=0.7, seed=1, stop=["\n\n"])
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.result.finish_reason, stream.result.stop_reason)

Options (max_new_tokens, sampling, stop strings, eos, repetition_penalty, logprobs, constraints) are
keyword arguments validated once into a GenerationOptions (options.py); what a call leaves out comes
from the folder's generation_config.json when it has one. Each call runs in a `Call` (call.py): the
prefill, then per step logits -> repetition penalty -> constraint mask -> sampling -> logprobs ->
stop checks. A ChatSession (chat.py) keeps one call's cache across the turns of a conversation.

Batches of prompts are left-padded, with position ids `cumsum(mask) - 1` (pads at 1), as
transformers' `generate` builds them, so each row generates what it would alone. A loaded
Generator serves concurrent calls from several threads: ONNX Runtime sessions are safe to run
concurrently and every call keeps its state (cache, random generator) to itself; a seed gives the
same tokens whatever runs beside it.

The tokenizer is loaded when text first goes in or out (a text prompt, a chat template, stop
strings, a stream, a constraint, a result's `.text`), once. A Generator given token ids and read
for token ids (`generate_ids(...)[0].token_ids`) never loads it: its stop ids come from the
folder's files (config.json, generation_config.json, and the tokenizer's eos token read by
runtime/eos.py), so a generating process carries no `tokenizers` (issue 11's memory goal).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgellama.errors import ModelFolderError, RuntimeInputError
from edgellama.runtime import kv_loop
from edgellama.runtime.call import Call, GenerationResult, Stream
from edgellama.runtime.eos import Undecided, tokenizer_eos_id
from edgellama.runtime.options import GenerationOptions, read_generation_config
from edgellama.runtime.session import OrtModel
from edgellama.runtime.speculative import make_loop as speculative_loop

__all__ = ["Generator", "GenerationResult", "GenerationOptions", "Stream", "check_text"]

Prompt = str | Sequence[dict[str, str]]     # text, or chat messages [{"role": ..., "content": ...}]


class Generator:
    """Generation over one loaded model folder (see the module docstring)."""

    def __init__(self, model: str | Path | OrtModel, *, provider: str = "auto", threads: int | None = None,
                 strict: bool | None = None, loop: str | None = None, tokenizer: Any = None):
        self.model = model if isinstance(model, OrtModel) else OrtModel(model, provider=provider, threads=threads,
                                                                         strict=strict)
        self.config = self.model.config
        self.loop_mode = loop or kv_loop.default_mode(self.model)
        kv_loop.check_mode(self.model, self.loop_mode)   # a static-cache folder runs the static loop
        self._tokenizer = _LazyTokenizer(self.model.folder, tokenizer)
        # Options a call leaves out come from here (see options.py); its eos ids stop generation too.
        self.generation_defaults, eos_ids = read_generation_config(self.model.folder)
        stops = set(self.config.eos_token_ids) | set(eos_ids)
        stops.update(self._tokenizer_eos())
        self.stop_ids = frozenset(stops)
        pad = self.config.pad_token_id
        self.pad_id = pad if pad is not None else (min(stops) if stops else 0)

    # -- tokenizer ------------------------------------------------------------------------------------
    def _tokenizer_eos(self) -> list[int]:
        """The tokenizer's eos id (a stop token too), read from the folder's files (runtime/eos.py)
        unless a tokenizer was given or the files leave it to the tokenizer to say."""
        if self._tokenizer.value is None:
            try:
                tok_eos = tokenizer_eos_id(self.model.folder)
                return [] if tok_eos is None else [tok_eos]
            except Undecided:
                pass
        tok_eos = getattr(self.tokenizer_or_none, "eos_token_id", None)
        return [tok_eos] if isinstance(tok_eos, int) else []

    @property
    def tokenizer_or_none(self) -> Any:
        """The folder's tokenizer, loaded on first need (text in or out: a Generator given token ids
        and read for token ids never loads it), once, whichever thread asks first; None without one
        (a folder that cannot give one is asked again next time)."""
        return self._tokenizer.get()

    @property
    def tokenizer(self) -> Any:
        tok = self.tokenizer_or_none
        if tok is None:
            raise ModelFolderError(f"{self.model.folder}: no usable tokenizer (tokenizer.json); pass token ids")
        return tok

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with `chat`, through the folder's chat template (a generation prompt added)."""
        check_text(prompt)
        tok = self.tokenizer
        if chat or not isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if hasattr(tok, "chat_ids"):
                return list(tok.chat_ids(messages))
            return list(tok.encode(tok.apply_chat_template(messages)))
        return list(tok.encode(prompt))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)

    def decoder(self) -> Callable[[Sequence[int]], str]:
        """`decode` as a function that holds the tokenizer (loaded or not), not this Generator: a
        result decoded when it is read keeps no session alive."""
        return self._tokenizer.decode

    def int_decoder(self) -> Callable[[list[int]], str]:
        """`decode` for lists of Python ints, as a text stream keeps them: the tokenizer's own decode,
        without this wrapper's lookup and conversion (a stream decodes twice a token)."""
        tok = self.tokenizer_or_none
        return _no_text if tok is None else tok.decode

    # -- public calls -----------------------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **kwargs: Any) -> GenerationOptions:
        """One call's GenerationOptions: `options` as given (kwargs replace its fields), or built from
        keyword arguments with this folder's generation_config.json filling the rest."""
        if options is None:
            return GenerationOptions.build(self.generation_defaults, **kwargs)
        if not isinstance(options, GenerationOptions):
            raise RuntimeInputError(f"options must be a GenerationOptions, got {type(options).__name__}")
        if kwargs:
            fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "defaults"}
            return dataclasses.replace(GenerationOptions.build(None, **{**fields, **kwargs}),
                                       defaults=options.defaults)
        return options

    def generate(self, prompt: Prompt | list[Prompt], *, chat: bool = False, options: GenerationOptions | None = None,
                 speculative: Any = None, **kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns one result) or a list of prompts (returns a list, one batch).

        Keyword arguments are GenerationOptions fields: max_new_tokens, temperature, top_k, top_p, seed,
        stop (strings), eos, repetition_penalty, logprobs, json_schema, regex, grammar."""
        opts = self.options(options, **kwargs)
        many = _many(prompt)
        prompts = prompt if many else [prompt]
        if not prompts:
            raise RuntimeInputError("no prompts given")
        ids = [self.encode(p, chat=chat) for p in prompts]
        results = self.generate_ids(ids, options=opts, speculative=speculative)
        return results if many else results[0]

    def generate_ids(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *,
                     options: GenerationOptions | None = None, speculative: Any = None,
                     **kwargs: Any) -> list[GenerationResult]:
        """Generate from token ids: one list of ids, or several (one left-padded batch). Always a list.

        `speculative` (one prompt): "prompt-lookup", a draft model folder or Generator (runtime/speculative.py)."""
        opts = self.options(options, **kwargs)
        rows = _as_rows(prompt_ids)
        run = Call(self, rows, options=opts, loop=speculative_loop(self, speculative, rows=rows, options=opts))
        for _ in run.steps():
            pass
        return run.results()

    def stream(self, prompt: Prompt, *, chat: bool = False, options: GenerationOptions | None = None,
               result: list | None = None, speculative: Any = None, **kwargs: Any) -> Stream:
        """A Stream of text pieces of one prompt's answer; its `.result` is the GenerationResult.

        `result=[]` (deprecated, read `.result` instead) still receives the result when the stream ends."""
        if _many(prompt):
            raise RuntimeInputError("stream() streams one prompt; use generate() for a list of prompts")
        opts = self.options(options, **kwargs)
        return self.stream_ids(self.encode(prompt, chat=chat), options=opts, result=result, speculative=speculative)

    def stream_ids(self, prompt_ids: Sequence[int], *, options: GenerationOptions | None = None,
                   result: list | None = None, speculative: Any = None, **kwargs: Any) -> Stream:
        """`stream` from one list of token ids."""
        opts = self.options(options, **kwargs)
        rows = _as_rows(prompt_ids)
        if len(rows) != 1:
            raise RuntimeInputError("stream() streams one prompt; use generate_ids() for several")
        on_close = None
        if result is not None:
            warnings.warn("stream(result=[]) is deprecated: read the returned Stream's .result", DeprecationWarning,
                          stacklevel=2)
            on_close = lambda res, error: result.append(res)   # noqa: E731
        loop = speculative_loop(self, speculative, rows=rows, options=opts)
        return Stream(Call(self, rows, options=opts, text=True, loop=loop), on_close=on_close)

    def constraint(self, options: GenerationOptions) -> Any:
        """A fresh token constraint (runtime/constraints.py) for one sequence of a constrained call."""
        from edgellama.runtime.constraints import build_constraint

        return build_constraint(tokenizer=self.tokenizer, vocab_size=self.config.vocab_size,
                                eos_ids=sorted(self.stop_ids), json_schema=options.json_schema,
                                regex=options.regex, grammar=options.grammar)


class _LazyTokenizer:
    """A Generator's tokenizer: the one it was given, else the folder's, loaded on first `get`, once
    (a lock: the first of several threads loads it, the others wait for it); None while the folder
    gives none. Kept apart from the Generator so that a deferred text holds it and not the session."""

    def __init__(self, folder: Path, tokenizer: Any = None):
        self.folder, self.value, self._lock = folder, tokenizer, threading.Lock()

    def get(self) -> Any:
        if self.value is None:
            with self._lock:
                if self.value is None:
                    from edgellama.tokenizer import Tokenizer

                    try:
                        self.value = Tokenizer.from_folder(self.folder)
                    except Exception:  # noqa: BLE001 - a folder without tokenizer files still runs token ids
                        return None
        return self.value

    def decode(self, ids: Sequence[int]) -> str:
        tok = self.get()
        if tok is None:
            return ""
        return tok.decode([int(i) for i in ids])


def _no_text(ids: Sequence[int]) -> str:
    return ""


def _many(prompt: Any) -> bool:
    """A list of prompts (not one chat conversation, a list of message dicts)."""
    return isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], dict))


def check_text(prompt: Any) -> None:
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
