"""Measure decode speed of an exported model folder against transformers and onnxruntime-genai.

Runs edgellama's Generator on MODEL and, per --against, transformers' LlamaForCausalLM (eager,
fp32, the folder's source weights), onnxruntime-genai on its own model builder's export of the
same checkpoint at the same precision (`genai`), and onnxruntime-genai on MODEL itself
(`genai-folder`). A fixed prompt of --prompt-tokens ids, --new-tokens greedy tokens without early
stop, one warm-up each, then --runs interleaved rounds; prints medians of prefill ms and decode
tokens/s, and the memory-bandwidth bound (measured numpy copy bandwidth / weight bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edgellama.runtime.kv_loop import MODES, STATIC
from edgellama.runtime.session import PROVIDERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path)
    p.add_argument("--provider", default="cpu", choices=PROVIDERS)
    p.add_argument("--against", default="", metavar="LIST",
                   help="comma-separated: torch, genai (builder export), genai-folder (genai on MODEL)")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="N")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--runs", type=int, default=3, metavar="N")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every runner (default: all)")
    p.add_argument("--loop", default=None, choices=[*MODES, STATIC, "all"],
                   help="edgellama's KV loop (default: the provider's best; 'all' runs each)")
    p.add_argument("--genai-dir", type=Path, default=None,
                   help="where onnxruntime-genai's builder output is kept between runs (default: a temp folder)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="bar chart (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgellamaError
    from edgellama.check import bench
    from edgellama.runtime.session import resolve_provider

    against = [a.strip() for a in args.against.split(",") if a.strip()]
    unknown = [a for a in against if a not in bench.AGAINST]
    if unknown:
        raise EdgellamaError(f"unknown --against {', '.join(unknown)}; choose from {', '.join(bench.AGAINST)}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EdgellamaError("--plot needs matplotlib (pip install matplotlib)") from None
    say = (lambda s: None) if args.quiet else (lambda s: print(f"[edgellama] {s}", file=sys.stderr, flush=True))
    provider = resolve_provider(args.provider)
    if args.loop == "all":   # every loop that fits the folder's KV cache contract
        from edgellama.folder import read_manifest

        loops = [STATIC] if read_manifest(args.model).kv_cache == STATIC else list(MODES)
    else:
        loops = [args.loop]
    runners = [bench.OursRunner(args.model, provider=provider, threads=args.threads, loop=loop) for loop in loops]
    config = runners[0].gen.config
    precision = runners[0].precision
    with tempfile.TemporaryDirectory(prefix="edgellama-bench-") as tmp:
        for name in against:
            if name == "torch":
                say("loading the source weights into transformers")
                runners.append(bench.TorchRunner(args.model, threads=args.threads))
            elif name == "genai-folder":
                runners.append(bench.GenaiRunner(args.model, name="onnxruntime-genai (this folder)",
                                                 precision=precision, provider=provider, threads=args.threads))
            elif name == "genai":
                built = _genai_builder_output(args, bench, precision, provider, Path(tmp), say)
                runners.append(bench.GenaiRunner(built, name="onnxruntime-genai (its builder)", precision=precision,
                                                 provider=provider, threads=args.threads))
        say("measuring memory bandwidth")
        bandwidth = bench.measure_bandwidth()
        prompt = bench.bench_prompt(config.vocab_size, args.prompt_tokens)
        rows = bench.run_bench(runners, prompt=prompt, new_tokens=args.new_tokens, runs=args.runs,
                               bandwidth=bandwidth, progress=say)
    if args.json:
        print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "prompt_tokens": args.prompt_tokens,
                          "new_tokens": args.new_tokens, "threads": args.threads, "provider": provider,
                          "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"{args.model}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, "
              f"{provider}, threads {args.threads or 'all'}, median of {args.runs}")
        print(bench.format_table(rows, bandwidth=bandwidth))
    if args.plot is not None:
        print(f"plot: {bench.plot(rows, args.plot)}", file=sys.stderr)
    return 0


def _genai_builder_output(args, bench, precision: str, provider: str, tmp: Path, say) -> Path:
    """onnxruntime-genai's builder export of the folder's source at `precision`, kept in --genai-dir."""
    from edgellama.errors import EdgellamaError
    from edgellama import folder as model_folder

    if precision not in ("fp32", "fp16", "int8", "int4"):
        raise EdgellamaError(f"onnxruntime-genai's builder has no {precision} precision to compare with")
    spec = model_folder.read_manifest(args.model).source_spec
    base = args.genai_dir or tmp
    out = Path(base) / f"{Path(spec).name}-{precision}-{provider}"
    if (out / "genai_config.json").is_file():
        return out
    from edgellama.export.sources import save_hf_folder

    hf = Path(base) / f"{Path(spec).name}-hf"
    if not (hf / "config.json").is_file():
        say(f"writing {spec} as a Hugging Face folder for onnxruntime-genai's builder")
        save_hf_folder(spec, hf)
    say(f"running onnxruntime-genai's model builder ({precision}, {provider}); this takes a while")
    return bench.build_genai_model(hf, out, precision=precision, provider=provider)
