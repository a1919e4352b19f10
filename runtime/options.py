"""The options of one generation call, validated once, and the defaults a folder brings.

    opts = gen.options(temperature=0.7, stop=["\\n\\n"], logprobs=3)   # or GenerationOptions(...)

Every public call (`Generator.generate/generate_ids/stream/stream_ids`, `ChatSession.send/stream`)
takes these as keyword arguments, or one `options=GenerationOptions(...)` taken as it is.
Keyword arguments left out come from the folder's `generation_config.json` when it has one,
read as transformers reads it: `temperature`, `top_k`, `top_p` only when `do_sample` is true
(transformers' own defaults 1.0 / 50 / 1.0 fill what the file leaves out, as its `generate`
does), `repetition_penalty` always, `eos_token_id` joins the Generator's stop tokens. A result
lists in `defaults` which options came from the file; an explicit argument always wins.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from edgellama.errors import ModelFolderError, RuntimeInputError
from edgellama.runtime.sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
_HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}   # transformers' GenerationConfig defaults


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """One call's request.

    max_new_tokens      new tokens at most (cut to what fits the context: the result's `capped`)
    temperature/top_k/top_p/seed
                        0 = greedy; sampling filters as transformers' warpers; a seed makes it repeatable
    stop                stop strings (str or several): the text ends before the first one found,
                        matched across token boundaries; finish_reason "stop", stop_reason the string
    eos                 stop on the model's end-of-sequence tokens (default True)
    repetition_penalty  transformers' semantics over prompt + generated ids (1.0 = off)
    logprobs            None = off; K >= 0: per new token its log-probability and the K most likely
                        (raw model distribution: before penalty, constraint and temperature, as vLLM)
    json_schema/regex/grammar
                        at most one: the output is constrained to it (llguidance), finish_reason
                        "stop" when the constraint is complete
    defaults            names taken from the folder's generation_config.json (filled by `build`)
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: bool = True
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None
    defaults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.sampling   # noqa: B018 - validates temperature, top_k, top_p
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise RuntimeInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, bool) or not isinstance(stop, (tuple, list)):
            raise RuntimeInputError(f"stop takes a string or a list of strings, got {self.stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise RuntimeInputError(f"a stop string must be text, got {s!r}")
            if not s:
                raise RuntimeInputError("a stop string cannot be empty")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.eos, bool):
            raise RuntimeInputError(f"eos must be True or False, got {self.eos!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (math.isfinite(rp) and rp > 0):
            raise RuntimeInputError(f"repetition_penalty must be a positive number, got {rp!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise RuntimeInputError(f"logprobs must be a non-negative integer (top alternatives per token) "
                                    f"or None, got {self.logprobs!r}")
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise RuntimeInputError(f"give at most one constraint, got {' and '.join(given)}")
        for key in ("regex", "grammar"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise RuntimeInputError(f"{key} must be a non-empty string")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def constrained(self) -> bool:
        return any(getattr(self, k) is not None for k in ("json_schema", "regex", "grammar"))

    @classmethod
    def build(cls, defaults: dict[str, Any] | None = None, **given: Any) -> "GenerationOptions":
        """Options from keyword arguments, `defaults` (a folder's generation config) filling the rest.

        `stop=True/False` is the EOS switch of earlier releases: still taken as `eos=`, with a
        DeprecationWarning (it goes away in the next release)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"defaults"}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise RuntimeInputError(f"unknown generation option {unknown[0]!r}; the options are "
                                    f"{', '.join(sorted(fields))}")
        if isinstance(given.get("stop"), bool):
            warnings.warn("stop=True/False is deprecated: it is the EOS switch, now eos=; stop takes stop "
                          "strings", DeprecationWarning, stacklevel=_caller())
            if "eos" in given:
                raise RuntimeInputError("give eos= only (stop=True/False is its deprecated spelling)")
            given["eos"] = given.pop("stop")
        given = {k: v for k, v in given.items() if v is not None}   # None: not given
        taken = {k: v for k, v in (defaults or {}).items() if k in fields and k not in given}
        options = cls(**taken, **given, defaults=tuple(sorted(taken)))
        greedy_filters = [k for k in ("top_k", "top_p") if k in given and given[k] not in (0, 1)]
        if greedy_filters and options.temperature == 0:
            warnings.warn(f"{' and '.join(greedy_filters)} with temperature 0: the call is greedy (give a "
                          "temperature > 0 to sample)", UserWarning, stacklevel=_caller())
        return options


def _caller() -> int:
    """The warnings stack level of the first frame outside this package: the application's call."""
    here = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _is_int(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value: Any, *, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFolderError(f"{path}: {key} must be a number, got {value!r}")
    return value


def read_generation_config(folder: str | Path) -> tuple[dict[str, Any], list[int]]:
    """(option defaults, eos ids) of a folder's generation_config.json; ({}, []) without one."""
    from edgellama.folder import inside, read_json

    folder = Path(folder)
    if not (folder / GENERATION_CONFIG).exists():
        return {}, []
    path = inside(folder, GENERATION_CONFIG, what="generation config")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: not a JSON object")
    out: dict[str, Any] = {}
    if data.get("do_sample") is True:
        for key, default in _HF_SAMPLING.items():
            value = _number(data.get(key, default), path=path, key=key)
            out[key] = int(value) if key == "top_k" else float(value)
        if out["temperature"] == 0:      # transformers refuses it; here it means greedy
            out = {}
    if data.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(_number(data["repetition_penalty"], path=path, key="repetition_penalty"))
    eos = data.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is None:
        eos = []
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise ModelFolderError(f"{path}: eos_token_id must be a token id or a list of them")
    try:
        GenerationOptions(**out)
    except RuntimeInputError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    return out, list(eos)
