"""The runtime's speed goals, side by side: smollm2, batch 1, 64-token prompt, 128 new tokens.

    python bench/speed.py --out out/speed                 # CPU, 2 threads, every precision
    python bench/speed.py --out out/speed --precisions fp32 --targets portable,ort

For each precision (fp32 export; int8 / int4 through quant.api.quantize_folder)
and target, our Generator runs interleaved with onnxruntime-genai on its own builder's export of
the same checkpoint at the same precision; fp32 adds transformers eager. Model folders and the
builder's output are kept under --out, so a second run only measures.

    python bench/speed.py --out out/speed --kv-compare --contexts 64,1024,3072 [--no-spin] [--rss]

--kv-compare: the KV cache contracts instead: ours with the static cache vs ours with the dynamic
cache (both `ort`, every decode step timed through runtime/kv_loop.py) vs onnxruntime-genai's
builder, interleaved rounds in one process, one table per precision and prompt length (--contexts;
default --prompt-tokens): prefill ms, decode tok/s, the median step, and with --rss each runner's
peak RSS in a child process of its own. --no-spin sets ONNX Runtime's
session.intra_op.allow_spinning=0 on every runner (the default leaves ONNX Runtime's choice).
--lm-head-bits 4: int4 folders quantized with a 4-bit lm_head (kept apart, suffix -lm4).
--precisions int4-fast: our int4-fast folders against the builder's int4 (the precision it has).

Where a step's time goes, graph against graph (ours vs the builder's, per op type): bench/profile_step.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/speed"))
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--targets", default="portable,ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--kv-compare", action="store_true", help="static vs dynamic KV cache vs genai (see above)")
    ap.add_argument("--contexts", default=None, help="with --kv-compare: prompt lengths, e.g. 64,1024,3072")
    ap.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning=0 on every runner")
    ap.add_argument("--rss", action="store_true", help="with --kv-compare: peak RSS per runner (child processes)")
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8), help="int4's lm_head bits (see above)")
    args = ap.parse_args()
    if args.kv_compare:
        return kv_compare(args)

    from edgellama.check import bench

    def say(s):
        print(f"[speed] {s}", file=sys.stderr, flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for precision in args.precisions.split(","):
        runners = []
        for target in args.targets.split(","):
            folder = bench.our_folder(args.source, out, precision=precision, target=target, say=say)
            runners.append(bench.OursRunner(folder, provider="cpu", threads=args.threads,
                                            name=f"edgellama {target}"))
        if not runners:
            continue
        built = bench.genai_folder(args.source, out, precision=precision, say=say)
        runners.append(bench.GenaiRunner(built, name="onnxruntime-genai builder", precision=bench.builder_precision(precision),
                                         threads=args.threads))
        runners.append(bench.GenaiRunner(runners[0].gen.model.folder, name="onnxruntime-genai on our folder",
                                         precision=precision, threads=args.threads))
        if precision == "fp32" and not args.no_torch:
            runners.append(bench.TorchRunner(runners[0].gen.model.folder, threads=args.threads))
        bandwidth = bench.measure_bandwidth()
        prompt = bench.bench_prompt(runners[0].gen.config.vocab_size, args.prompt_tokens)
        rows = bench.run_bench(runners, prompt=prompt, new_tokens=args.new_tokens, runs=args.runs,
                               bandwidth=bandwidth, progress=say)
        print(f"\n== {args.source} {precision}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
              f"batch 1, CPU, {args.threads} threads, median of {args.runs}")
        print(bench.format_table(rows, bandwidth=bandwidth), flush=True)
        all_rows += [{**r.to_dict(), "bandwidth_bytes_per_s": bandwidth} for r in rows]
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


def kv_compare(args) -> None:
    from edgellama.check import bench

    def say(s):
        print(f"[speed] {s}", file=sys.stderr, flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = {"session.intra_op.allow_spinning": "0"} if args.no_spin else None
    contexts = [int(c) for c in (args.contexts or str(args.prompt_tokens)).split(",")]
    all_rows = []
    for precision in args.precisions.split(","):
        head = args.lm_head_bits if precision == "int4" and args.lm_head_bits == 4 else None
        folders = {contract: bench.our_folder(args.source, out, precision=precision, kv_cache=contract,
                                              lm_head_bits=head, say=say)
                   for contract in ("static", "dynamic")}
        runners = [bench.LoopRunner(folders[c], threads=args.threads, session_config=config,
                                    name=f"edgellama {c} cache") for c in ("static", "dynamic")]
        genai_folder = None
        if args.source in ("smollm2",) or Path(args.source).is_dir():
            genai_folder = bench.genai_folder(args.source, out, precision=precision, say=say)
        else:   # a source genai's builder cannot read (tiny): genai runs our static folder
            genai_folder = folders["static"]
        runners.append(bench.GenaiRunner(genai_folder, name="onnxruntime-genai", precision=bench.builder_precision(precision),
                                         threads=args.threads, session_config=config))
        for context in contexts:
            prompt = bench.bench_prompt(runners[0].model.config.vocab_size, context)
            rows = bench.run_bench(runners, prompt=prompt, new_tokens=args.new_tokens, runs=args.runs, progress=say)
            if args.rss:
                kinds = [("loop", folders["static"]), ("loop", folders["dynamic"]), ("genai", genai_folder)]
                for row, (kind, folder) in zip(rows, kinds):
                    row.peak_rss_mb = bench.peak_rss_mb(kind, folder, prompt=prompt, new_tokens=args.new_tokens,
                                                        threads=args.threads, session_config=config)
            print(f"\n== {args.source} {precision}: {context}-token prompt, {args.new_tokens} new tokens, batch 1, "
                  f"CPU, {args.threads} threads, {args.runs} interleaved rounds{' (no spinning)' if config else ''}")
            print(bench.format_table(rows), flush=True)
            same = {r.name: r.tokens == rows[0].tokens for r in rows}
            print(f"greedy tokens identical to {rows[0].name}: {same}")
            all_rows += [{**r.to_dict(), "context": context, "no_spin": bool(config)} for r in rows]
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
