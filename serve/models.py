"""The models a server serves: each a name (the folder's name, or NAME=PATH) and one loaded Generator."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from edgellama.errors import EdgellamaError


@dataclasses.dataclass
class ServedModel:
    name: str
    folder: Path
    generator: Any          # edgellama.runtime.Generator
    created: int
    chats: Any = None       # serve.chat_cache.ChatCache, None: no chat sessions kept

    @property
    def context(self) -> int:
        return int(self.generator.model.max_positions)

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgellama",
                "context_length": self.context, "provider": self.generator.model.provider}


def parse_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`PATH` (named after the folder) or `NAME=PATH`; names must be unique."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise EdgellamaError(f"model {spec!r}: expected PATH or NAME=PATH")
        if any(name == n for n, _ in out):
            raise EdgellamaError(f"model name {name!r} given twice (name them with NAME=PATH)")
        out.append((name, Path(path)))
    if not out:
        raise EdgellamaError("no model folders given")
    return out


def load_models(specs: Sequence[str], *, provider: str = "auto", threads: int | None = None,
                chat_sessions: int = 4) -> dict[str, ServedModel]:
    """Load every folder once (a folder without a tokenizer is refused: the API speaks text);
    `chat_sessions` idle conversations are kept per model with their KV cache (0: none)."""
    from edgellama.runtime.generator import Generator
    from edgellama.serve.chat_cache import ChatCache

    if chat_sessions < 0:
        raise EdgellamaError(f"--chat-sessions must be at least 0, got {chat_sessions}")
    models: dict[str, ServedModel] = {}
    for name, path in parse_specs(specs):
        gen = Generator(path, provider=provider, threads=threads)
        gen.tokenizer  # noqa: B018 - raises ModelFolderError now rather than on the first request
        models[name] = ServedModel(name=name, folder=path, generator=gen, created=int(time.time()),
                                   chats=ChatCache(gen, size=chat_sessions))
    return models
