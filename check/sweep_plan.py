"""A sweep plan: sources x targets x precisions x providers, read and checked before any cell runs.

    {"sources": ["tiny", "models/my-llama", {"name": "q4", "source": "m.Q4_1.gguf"}],
     "targets": ["portable", "ort"], "precisions": ["fp32", "int8"], "providers": ["cpu"],
     "parity": {"decode_steps": 4, "prompts": ["..."]},
     "quality": {"text": "eval.txt", "tokens": 256, "window": 128},
     "threads": 1}

JSON, or TOML (the same keys) on Python 3.11+ where the standard library reads it. A relative
source path or text file is read from the plan's folder, so a plan travels with its models; a
built-in name (`tiny`, `smollm2`) wins over a same-named path, as in `edgellama export`. Every
mistake (an unknown key, target, precision or provider, a missing source or text file) is one
EdgellamaError naming the plan, raised before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from edgellama.errors import EdgellamaError

PROVIDERS = ("cpu", "cuda")
KEYS = {"sources", "targets", "precisions", "providers", "parity", "quality", "threads"}
PARITY_KEYS = {"decode_steps", "prompts"}
QUALITY_KEYS = {"text", "tokens", "window"}
# Small enough that a tiny cell's quality check takes about a second, large enough that its
# KL and top-1 agreement average over a few hundred positions.
DEFAULT_TOKENS = 256
DEFAULT_WINDOW = 128
DEFAULT_DECODE_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Source:
    name: str      # what cell ids and tables show
    spec: str      # what export_model reads: a built-in name or an absolute path


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every cell of a plan shares; part of each cell's key, so changing it reruns the cells."""
    decode_steps: int = DEFAULT_DECODE_STEPS
    prompts: tuple[str, ...] | None = None
    text: str | None = None         # absolute path of the quality text; None: the stdlib docstrings
    text_sha256: str | None = None
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"] = list(self.prompts) if self.prompts is not None else None
        return d


@dataclasses.dataclass(frozen=True)
class Cell:
    source: Source
    target: str
    precision: str
    provider: str
    settings: Settings

    @property
    def id(self) -> str:
        return f"{self.source.name}-{self.target}-{self.precision}-{self.provider}"

    def key(self) -> dict[str, Any]:
        """Everything that decides this cell's result: a stored result with another key is stale."""
        return {"source": self.source.spec, "target": self.target, "precision": self.precision,
                "provider": self.provider, "settings": self.settings.to_dict()}


@dataclasses.dataclass(frozen=True)
class Plan:
    path: Path
    sources: tuple[Source, ...]
    targets: tuple[str, ...]
    precisions: tuple[str, ...]
    providers: tuple[str, ...]
    settings: Settings

    def cells(self) -> list[Cell]:
        """Every combination, sources outermost (a worker reuses a source's files while they are warm)."""
        return [Cell(s, t, p, v, self.settings) for s in self.sources for t in self.targets
                for p in self.precisions for v in self.providers]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sources": [dataclasses.asdict(s) for s in self.sources],
                "targets": list(self.targets), "precisions": list(self.precisions),
                "providers": list(self.providers), "settings": self.settings.to_dict()}


# -- reading ------------------------------------------------------------------------------------------
def _read(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EdgellamaError(f"cannot read the plan {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise EdgellamaError(f"{path}: TOML plans need Python 3.11+ (tomllib); write the plan as JSON") from None
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise EdgellamaError(f"{path} is not valid TOML: {e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgellamaError(f"{path} is not valid JSON: {e}") from None


def _names(plan: dict, key: str, choices: tuple[str, ...], *, where: Path) -> tuple[str, ...]:
    value = plan.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise EdgellamaError(f"{where}: `{key}` must be a non-empty list of names ({', '.join(choices)})")
    for v in value:
        if v not in choices:
            raise EdgellamaError(f"{where}: unknown {key[:-1]} {v!r}; choose from {', '.join(choices)}")
    return tuple(dict.fromkeys(value))


def _unknown(table: dict, known: set[str], *, what: str, where: Path) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise EdgellamaError(f"{where}: unknown {what} {', '.join(map(repr, extra))}; "
                             f"known: {', '.join(sorted(known))}")


def _int(table: dict, key: str, default: int, *, low: int, where: Path, section: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EdgellamaError(f"{where}: `{section}{key}` must be an integer >= {low}, got {value!r}")
    return value


def _source_name(spec: str) -> str:
    p = Path(spec)
    stem = p.stem if p.suffix.lower() == ".gguf" else p.name
    return re.sub(r"[^A-Za-z0-9_.]+", "_", stem) or "source"


def _sources(plan: dict, *, where: Path) -> tuple[Source, ...]:
    from edgellama.export.sources import BUILTINS, check_source

    entries = plan.get("sources")
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise EdgellamaError(f"{where}: `sources` must be a non-empty list (built-in names, paths, "
                             "or {\"name\": ..., \"source\": ...})")
    out: list[Source] = []
    for entry in entries:
        if isinstance(entry, dict):
            _unknown(entry, {"name", "source"}, what="source field", where=where)
            spec, name = entry.get("source"), entry.get("name")
        else:
            spec, name = entry, None
        if not isinstance(spec, str) or not spec or (name is not None and not isinstance(name, str)):
            raise EdgellamaError(f"{where}: a source is a name or path string, or {{\"name\": str, "
                                 f"\"source\": str}}; got {entry!r}")
        if spec not in BUILTINS:
            path = Path(spec).expanduser()
            spec = str(path if path.is_absolute() else (where.parent / path).resolve())
        try:
            check_source(spec)
        except EdgellamaError as e:
            raise type(e)(f"{where}: {e}") from None
        name = name or _source_name(spec)
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise EdgellamaError(f"{where}: source name {name!r} must be letters, digits, '_' or '.' "
                                 "(it names the cells' result files)")
        out.append(Source(name, spec))
    seen: dict[str, str] = {}
    for s in out:
        if seen.setdefault(s.name, s.spec) != s.spec:
            raise EdgellamaError(f"{where}: two sources are both named {s.name!r}; give one a "
                                 "{\"name\": ..., \"source\": ...} entry")
    return tuple(dict.fromkeys(out))


def _settings(plan: dict, *, where: Path) -> Settings:
    parity, quality = plan.get("parity", {}), plan.get("quality", {})
    for name, table, known in (("parity", parity, PARITY_KEYS), ("quality", quality, QUALITY_KEYS)):
        if not isinstance(table, dict):
            raise EdgellamaError(f"{where}: `{name}` must be a table of settings ({', '.join(sorted(known))})")
        _unknown(table, known, what=f"{name} setting", where=where)
    prompts = parity.get("prompts")
    if prompts is not None:
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise EdgellamaError(f"{where}: `parity.prompts` must be a non-empty list of non-empty strings")
        prompts = tuple(prompts)
    text, text_sha = quality.get("text"), None
    if text is not None:
        if not isinstance(text, str) or not text:
            raise EdgellamaError(f"{where}: `quality.text` must be the path of a UTF-8 text file")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else (where.parent / path).resolve()
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except OSError as e:
            raise EdgellamaError(f"{where}: cannot read the quality text {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise EdgellamaError(f"{where}: the quality text {path} is not UTF-8") from None
        text, text_sha = str(path), hashlib.sha256(data).hexdigest()
    tokens = _int(quality, "tokens", DEFAULT_TOKENS, low=2, where=where, section="quality.")
    window = _int(quality, "window", DEFAULT_WINDOW, low=2, where=where, section="quality.")
    return Settings(decode_steps=_int(parity, "decode_steps", DEFAULT_DECODE_STEPS, low=0, where=where,
                                      section="parity."),
                    prompts=prompts, text=text, text_sha256=text_sha, tokens=tokens, window=window,
                    threads=_int(plan, "threads", 1, low=1, where=where, section=""))


def load_plan(path: Path | str) -> Plan:
    """The plan at `path`, every name and file checked (EdgellamaError otherwise)."""
    from edgellama.check.parity_tolerances import PRECISIONS
    from edgellama.folder import TARGETS

    path = Path(path).absolute()
    data = _read(path)
    if not isinstance(data, dict):
        raise EdgellamaError(f"{path}: a plan is an object with {', '.join(sorted(KEYS))}")
    _unknown(data, KEYS, what="key", where=path)
    for key in ("sources", "targets", "precisions"):
        if key not in data:
            raise EdgellamaError(f"{path}: the plan names no {key}")
    return Plan(path=path, targets=_names(data, "targets", TARGETS, where=path),
                precisions=_names(data, "precisions", PRECISIONS, where=path),
                providers=_names({"providers": data.get("providers", ["cpu"])}, "providers", PROVIDERS, where=path),
                settings=_settings(data, where=path), sources=_sources(data, where=path))
