"""The quantization passes, registered once, and the one check of a request.

Each pass module (fp16.py, int8.py, int8_dynamic.py, int4.py) defines
`apply(model: ir.Model, *, target: str, settings: Settings) -> dict`: it edits the model in place
and returns the manifest's record of the pass. This table says which settings each pass takes
and their defaults; the CLI builds its choices and flags from it. Nothing heavy is imported here
(the pass module is imported when the pass runs), so the CLI stays quick to start.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Iterable

from edgellama.errors import QuantError

# MatMulNBits (and GatherBlockQuantized) need a power of two >= 16; ONNX Runtime's CPU kernels
# (MLAS) implement 16..256. Per-channel (block = K) is not offered: K of real models (576, 2048)
# is rarely a power of two.
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)   # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
LM_HEAD_BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked request: defaults filled in for the settings the pass takes, None for the others."""
    block_size: int | None = None
    accuracy_level: int | None = None
    exclude: tuple[str, ...] = ()
    lm_head_bits: int | None = None


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    module: str                         # edgellama.quant.<module>.apply runs it
    help: str
    block_size: int | None = None       # the default; None: the pass takes no block size
    accuracy_level: int | None = None   # the default; None: the pass takes no accuracy level
    exclude: bool = True                # takes --exclude
    lm_head_bits: int | None = None     # the default; None: the pass takes no lm_head bit width
    dtype: str | None = None            # the folder's dtype afterwards; None: unchanged

    def apply(self, model: Any, *, target: str, settings: Settings) -> dict:
        module = importlib.import_module(f"edgellama.quant.{self.module}")
        return module.apply(model, target=target, settings=settings)


PASSES = {p.name: p for p in (
    Pass("fp16", "fp16", "weights, activations and KV cache in float16; norm statistics, softmax and logits "
         "in float32 (meant for CUDA; runs on CPU too)", exclude=False, dtype="fp16"),
    Pass("int8", "int8", "weight-only int8 (MatMulNBits bits=8, symmetric); lm_head included, the embedding "
         "int8 (shared with lm_head when tied)", block_size=32, accuracy_level=4),
    Pass("int8-dynamic", "int8_dynamic", "int8 weights and per-token int8 activations at run time "
         "(W8A8, MatMulInteger) for CPU; lm_head kept in fp32"),
    Pass("int4", "int4", "4-bit blockwise (MatMulNBits bits=4, zero points, error-minimizing scales) for the "
         "decoder layers; lm_head and embedding int8 (--lm-head-bits 4: 4-bit, faster, less accurate)",
         block_size=32, accuracy_level=4, lm_head_bits=8),
    Pass("int4-fast", "int4_fast", "int4 for speed: every decoder MatMul 4-bit (v_proj too) in blocks of 64, "
         "down_proj in 32; lm_head 4-bit in blocks of 32 (a tied embedding shares it). Faster and smaller than "
         "int4, less accurate (on smollm2 still ahead of onnxruntime-genai's int4 in KL, top-1 and perplexity)", block_size=64,
         accuracy_level=4, lm_head_bits=4),
)}
MODES = tuple(PASSES)


@dataclasses.dataclass(frozen=True)
class Request:
    """What `check_request` returns: the pass to run and its checked settings."""
    quant_pass: Pass
    settings: Settings


def _taking(setting: str) -> str:
    names = [p.name for p in PASSES.values() if getattr(p, setting) not in (None, False)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def pattern_list(exclude: Iterable[str] | str | None) -> tuple[str, ...]:
    """`--exclude a,b` or a list of names -> tuple of patterns."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = [exclude]
    return tuple(p.strip() for item in exclude for p in str(item).split(",") if p.strip())


def check_request(mode: str, block_size: int | None = None, *, accuracy_level: int | None = None,
                  exclude: Iterable[str] | str | None = (), lm_head_bits: int | None = None) -> Request:
    """The pass of `mode` and its settings, or QuantError for an unknown mode, a block size the
    kernels do not support, or a setting the pass does not take. Runs before anything is loaded."""
    p = PASSES.get(mode)
    if p is None:
        raise QuantError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if p.block_size is None and block_size is not None:
        raise QuantError(f"--block-size applies to {_taking('block_size')} only, not to {mode}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size not in BLOCK_SIZES):
        raise QuantError(f"block size {block_size!r} is not supported by MatMulNBits; "
                         f"choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if p.accuracy_level is None and accuracy_level is not None:
        raise QuantError(f"--accuracy-level applies to {_taking('accuracy_level')} only, not to {mode}")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS):
        raise QuantError(f"accuracy level {accuracy_level!r} is not one of MatMulNBits' "
                         f"{', '.join(map(str, ACCURACY_LEVELS))}")
    if p.lm_head_bits is None and lm_head_bits is not None:
        raise QuantError(f"--lm-head-bits applies to {_taking('lm_head_bits')} only, not to {mode}")
    if lm_head_bits is not None and (isinstance(lm_head_bits, bool) or lm_head_bits not in LM_HEAD_BITS):
        raise QuantError(f"lm_head bits {lm_head_bits!r} is not one of {', '.join(map(str, LM_HEAD_BITS))}")
    patterns = pattern_list(exclude)
    if patterns and not p.exclude:
        # Mixed fp32/fp16 graphs need a Cast at every boundary; not worth it for one MatMul.
        raise QuantError(f"--exclude is not supported by {mode} (every tensor of the graph is converted)")
    return Request(p, Settings(block_size=p.block_size if block_size is None else block_size,
                               accuracy_level=p.accuracy_level if accuracy_level is None else accuracy_level,
                               exclude=patterns,
                               lm_head_bits=p.lm_head_bits if lm_head_bits is None else lm_head_bits))
