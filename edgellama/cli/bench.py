"""Measure decode speed of an exported model folder against transformers and onnxruntime-genai.

Runs edgellama's Generator on MODEL and, per --against, transformers' LlamaForCausalLM (eager,
fp32, the folder's source weights), onnxruntime-genai on its own model builder's export of the
same checkpoint at the same precision (`genai`), and onnxruntime-genai on MODEL itself
(`genai-folder`). A fixed prompt of --prompt-tokens ids, --new-tokens greedy tokens without early
stop, one warm-up each, then --runs interleaved rounds; prints medians of prefill ms and decode
tokens/s, and the memory-bandwidth bound (measured numpy copy bandwidth / weight bytes).
--plot FILE.png draws the same figures as a bar chart (needs matplotlib: pip install edgellama[plot]).

With --json, one object instead of the table (schema "edgellama.bench", version 1): `model`,
`provider`, `threads` (null: all), `prompt_tokens`, `new_tokens`, `runs`,
`bandwidth_bytes_per_s`, `plot` (the PNG written, or null), and `rows`, one per runner: `name`,
`precision`, `weight_bytes`, `prefill_ms`, `decode_tokens_per_s` (medians), `runs`,
`bound_tokens_per_s`, `fraction_of_bound`, `tokens` (the last run's), `note`, `step_ms_median`,
`peak_rss_mb` (0 where not measured).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgellama.runtime.kv_loop import MODES, STATIC
from edgellama.runtime.session import PROVIDERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path, help="model folder written by `edgellama export`")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS, help="execution provider of edgellama's runner")
    p.add_argument("--against", default="", metavar="LIST",
                   help="comma-separated: torch, genai (builder export), genai-folder (genai on MODEL)")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="N", help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N", help="greedy tokens per run")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="timed rounds after the warm-up")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every runner (default: all)")
    p.add_argument("--loop", default=None, choices=[*MODES, STATIC, "all"],
                   help="edgellama's KV loop (default: the provider's best; 'all' runs each)")
    p.add_argument("--genai-dir", type=Path, default=None,
                   help="where onnxruntime-genai's builder output is kept between runs (default: a temp folder)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw a bar chart into FILE.png (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields above) instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgellamaError
    from edgellama.check import bench
    from edgellama.progress import Progress
    from edgellama.runtime.session import resolve_provider

    against = [a.strip() for a in args.against.split(",") if a.strip()]
    unknown = [a for a in against if a not in bench.AGAINST]
    if unknown:
        raise EdgellamaError(f"unknown --against {', '.join(unknown)}; choose from {', '.join(bench.AGAINST)}")
    if args.plot is not None:
        bench.check_plot_path(args.plot)
    progress = Progress(enabled=not args.quiet)
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
                progress.note("loading the source weights into transformers")
                runners.append(bench.TorchRunner(args.model, threads=args.threads))
            elif name == "genai-folder":
                runners.append(bench.GenaiRunner(args.model, name="onnxruntime-genai (this folder)",
                                                 precision=precision, provider=provider, threads=args.threads))
            elif name == "genai":
                built = _genai_builder_output(args, bench, precision, provider, Path(tmp), progress)
                runners.append(bench.GenaiRunner(built, name="onnxruntime-genai (its builder)", precision=precision,
                                                 provider=provider, threads=args.threads))
        with progress.step("measure memory bandwidth"):
            bandwidth = bench.measure_bandwidth()
        prompt = bench.bench_prompt(config.vocab_size, args.prompt_tokens)
        # One unit per run, the warm-ups included, so the estimate covers the whole benchmark.
        with progress.step(f"benchmark {len(runners)} runner(s)", total=len(runners) * (args.runs + 1)) as step:
            rows = bench.run_bench([_Counted(r, step) for r in runners], prompt=prompt, new_tokens=args.new_tokens,
                                   runs=args.runs, bandwidth=bandwidth, progress=progress)
    plotted = bench.plot(rows, args.plot, title=_title(args, provider)) if args.plot is not None else None
    if args.json:
        from edgellama.cli.output import print_json

        print_json("bench", {"model": str(args.model), "provider": provider, "threads": args.threads,
                             "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
                             "bandwidth_bytes_per_s": bandwidth, "plot": str(plotted) if plotted else None,
                             "rows": [r.to_dict() for r in rows]})
    else:
        print(f"{_title(args, provider)}, median of {args.runs}")
        print(bench.format_table(rows, bandwidth=bandwidth))
    if plotted is not None:
        progress.note(f"plot: {plotted}")
    return 0


def _title(args: argparse.Namespace, provider: str) -> str:
    return (f"{args.model.name or args.model}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
            f"batch 1, {provider}, threads {args.threads or 'all'}")


class _Counted:
    """A runner that advances the benchmark's progress step after each of its runs."""

    def __init__(self, runner, step):
        self._runner, self._step = runner, step

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def run(self, prompt, new_tokens):
        timing = self._runner.run(prompt, new_tokens)
        self._step.advance()
        return timing


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
