"""Quantize an fp32 or fp16 model folder (from `edgellama export`) into a new model folder.

The modes and what each does are listed below. OUT receives model.onnx (+ model.onnx.data), the
tokenizer, genai_config.json and edgellama.json (its `quantization` list records the pass and its
settings). IN must be an unquantized fp32 export, or an fp16 one for every mode but fp16: it is
widened to the fp32 graph of its fp16 weights first (the output has fp32 activations, as from an
fp32 export; an 8B model needs no 32 GB fp32 folder).

Prints OUT. With --json, one object instead (schema "edgellama.quantize", version 1): `input`
(absolute path of IN), `mode`, and as for export: `folder`, `files` ({name: bytes}), `bytes`,
`seconds`, `steps` ([{step, seconds}]), `manifest` (edgellama.json as written; its
`quantization` list holds the pass and its settings).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path


def add_quant_arguments(p: argparse.ArgumentParser, *, flag: str, required: bool, mode_help: str,
                        prefix: str = "") -> None:
    """The quantization flags, built from the pass registry: the mode (`flag`), --block-size,
    --accuracy-level and --exclude. `quantize` and `export --quant` both declare them here."""
    from edgellama.quant.registry import ACCURACY_LEVELS, BLOCK_SIZES, LM_HEAD_BITS, MODES, PASSES

    def taking(setting: str) -> str:
        return "/".join(p.name for p in PASSES.values() if getattr(p, setting) not in (None, False))

    def default(setting: str) -> str:
        """The pass defaults of `setting`, one per distinct value: `32; int4-fast: 64`."""
        values: dict[int, list[str]] = {}
        for q in PASSES.values():
            if getattr(q, setting) is not None:
                values.setdefault(getattr(q, setting), []).append(q.name)
        first, *rest = values.items()
        return "; ".join([str(first[0]), *(f"{'/'.join(names)}: {v}" for v, names in rest)])

    p.add_argument(flag, required=required, default=None, choices=MODES, help=f"{mode_help} (modes below)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"{prefix}{taking('block_size')} block size: {', '.join(map(str, BLOCK_SIZES))} "
                   f"(default {default('block_size')})")
    p.add_argument("--accuracy-level", type=int, default=None, choices=ACCURACY_LEVELS,
                   help=f"{prefix}{taking('accuracy_level')}: MatMulNBits accuracy_level; 4 quantizes activations "
                   "to int8 at run time (fast on CPU), 0 keeps them fp32 (more accurate, much slower on CPU) "
                   f"(default {default('accuracy_level')})")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=LM_HEAD_BITS,
                   help=f"{prefix}{taking('lm_head_bits')}: bits of lm_head (and of a tied embedding); 8 keeps most "
                   f"of the quality, 4 is faster and smaller but much less accurate (default {default('lm_head_bits')})")
    p.add_argument("--exclude", default="", metavar="NAMES",
                   help=f"{prefix}comma-separated node or module names (fnmatch patterns) to keep unquantized, "
                   "e.g. `lm_head` or `model.layers.0.*`")
    modes = "\n".join(textwrap.fill(f"{name:13} {q.help}", 96, subsequent_indent=" " * 16, initial_indent="  ")
                      for name, q in PASSES.items())
    p.epilog = f"modes ({flag}):\n{modes}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, metavar="IN", help="model folder written by `edgellama export`")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="model folder to write")
    add_quant_arguments(p, flag="--mode", required=True, mode_help="quantization mode")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields above) instead of OUT")


def run(args: argparse.Namespace) -> int:
    import time

    from edgellama.progress import Progress
    from edgellama.quant.api import quantize_folder

    start = time.perf_counter()
    progress = Progress(enabled=not args.quiet)
    out = quantize_folder(args.input, args.output, mode=args.mode, block_size=args.block_size,
                          exclude=args.exclude, force=args.force, accuracy_level=args.accuracy_level,
                          lm_head_bits=args.lm_head_bits, progress=progress)
    if args.json:
        from edgellama.cli.output import folder_payload, print_json

        payload = folder_payload(out, seconds=time.perf_counter() - start, steps=progress.steps)
        print_json("quantize", {"input": str(args.input.absolute()), "mode": args.mode, **payload})
    else:
        print(out)
    return 0
