"""edgellama.check: the CI layer. Parity (torch against ONNX Runtime, or one folder against
another) with its metrics, tolerances, sides, localization and reports; quantization quality;
speed benchmarks beside torch and onnxruntime-genai.

It reads the base package, export (for the torch side and sources) and runtime (the sessions it
checks); nothing below it imports it.
"""

from __future__ import annotations

from typing import Any

# Loaded on first use: the CLI imports light modules of this package (tolerances) without torch or ORT.
_LAZY = {"run_parity": "parity", "report_passed": "parity"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
