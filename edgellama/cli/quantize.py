"""Quantize an fp32 model folder (from `edgellama export`) into a new model folder.

Modes:
  fp16          weights, activations and KV cache in float16; norm statistics, softmax and
                logits in float32 (meant for CUDA; runs on CPU too)
  int8          weight-only int8 (MatMulNBits bits=8, symmetric, blocks of 32 by default);
                lm_head included, the embedding int8 (shared with lm_head when tied)
  int8-dynamic  int8 weights and dynamically quantized int8 activations (W8A8, standard
                DynamicQuantizeLinear + MatMulInteger) for CPU; lm_head kept in fp32
  int4          4-bit blockwise (MatMulNBits bits=4, blocks of 32 by default, zero points,
                error-minimizing scales) for the decoder layers; lm_head and embedding int8
--block-size (int8, int4): 16, 32, 64, 128 or 256.
--accuracy-level (int8, int4): MatMulNBits' compute type; 4 (default) quantizes activations to
  int8 at run time (fast on CPU), 0 keeps them fp32 (more accurate, much slower on CPU).
--exclude: comma-separated node or module names (fnmatch patterns) to leave in fp32, e.g.
  `lm_head` or `model.layers.0.*`.
OUT receives model.onnx (+ model.onnx.data), the tokenizer, genai_config.json and edgellama.json
(its `quantization` list records the pass and its settings). IN must be an unquantized fp32 export.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, metavar="IN", help="model folder written by `edgellama export`")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    p.add_argument("--mode", required=True, choices=["fp16", "int8", "int8-dynamic", "int4"])
    p.add_argument("--block-size", type=int, default=None, help="int8/int4 block size (default 32)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="int8/int4: MatMulNBits accuracy_level (default 4)")
    p.add_argument("--exclude", default="", metavar="NAMES",
                   help="comma-separated node/module names (fnmatch patterns) to keep unquantized")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from edgellama.progress import Progress
    from edgellama.quant.api import check_request, quantize_folder

    check_request(mode=args.mode, block_size=args.block_size, accuracy_level=args.accuracy_level)
    out = quantize_folder(args.input, args.output, mode=args.mode, block_size=args.block_size,
                          exclude=args.exclude, force=args.force, accuracy_level=args.accuracy_level,
                          progress=Progress(enabled=not args.quiet))
    print(out)
    return 0
