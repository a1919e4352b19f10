"""edgellama.serve: an OpenAI-compatible HTTP server over one or more model folders.

    from edgellama.serve import create_app, load_models
    app = create_app(load_models(["out/smollm2"]), api_key=None)    # a FastAPI app; run it with uvicorn

`/v1/chat/completions` and `/v1/completions` (streamed as server-sent events), `/v1/models`,
`/health`. `edgellama serve MODEL...` runs it on uvicorn, or as a Ray Serve deployment with
`--ray`. It builds on the runtime's Generator; nothing in edgellama imports it but the CLI.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"create_app": "app", "load_models": "models", "ServeSettings": "settings"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
