"""edgellama.runtime: the embeddable core: ONNX Runtime sessions, the KV-cache loop, generation,
sampling and text streaming.

    from edgellama.runtime import Generator
    gen = Generator("out/smollm2", provider="auto")
    print(gen.generate("What is the capital of France?", chat=True).text)
"""

from __future__ import annotations

from typing import Any

# Loaded on first use, so that importing a light module of this package (sampling) does not load
# ONNX Runtime.
_LAZY = {"Generator": "generator", "GenerationResult": "call", "GenerationOptions": "options", "Stream": "call",
         "ChatSession": "chat", "OrtModel": "session", "SamplingParams": "sampling", "TokenLogprob": "sampling"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
