"""Issue 11's memory goal: peak RSS of a 128-token greedy generation, ours against onnxruntime-genai.

    python bench/rss.py --out /tmp/mem                       # fp32, int8, int4; 64-token prompt
    python bench/rss.py --out /tmp/mem --precisions int8 --runner loop

Each figure comes from a fresh child process that loads one runner on one folder and generates
once (check/bench.memory_profile): ours through `edgellama.runtime.Generator` (--runner generator,
the default) or the bare KV loop (--runner loop, what bench/speed.py --rss measures), genai through
its own Generator on its builder's export of the same checkpoint. Besides the peak, each phase's
resident memory: after the imports (onnxruntime and the runner's modules), after the session is
created, after the generation; `anon` is heap (copies, arenas), `file` mapped files (libraries,
mmap'd weights), so a row says where its memory went.

Folders under --out, built when missing and reused after (check/bench.our_folder, genai_folder, as
bench/speed.py builds them): ours `ort` with its default (static) KV cache, as `edgellama export
smollm2 --target ort` and `edgellama quantize` write them; genai's builder output of the same checkpoint.

--lm-head-bits 4 quantizes our int4 folder with a 4-bit lm_head (folder -lm4), as genai's builder
writes its int4 (MatMulNBits bits=4, its embedding a GatherBlockQuantized of the same bytes); our
default keeps the lm_head at 8 bits, a table of 27 MB instead of 14.

Measured (2026-12-03 06:26-06:34, 2 shared cores, onnxruntime 1.31.1, onnxruntime-genai 0.18.0), peak
MB, ours / genai: Generator fp32 687 / 810, int8 289 / 290, int4 243 / 235, int4 --lm-head-bits 4
216 / 235; loop int4 242. The Generator now loads no tokenizer for token ids in and out
(runtime/eos.py): on the same folders minutes apart, the tokenizer loaded in Generator.__init__ as
before peaks at 275 at int4. What is left of the int4 gap at the default lm_head is mapped-file
memory: the int8 tied table read in place (27 MB resident) and the MatMulNBits scales and zero
points that stay mapped after ONNX Runtime prepacked them (~15 MB); heap (anon) is below genai's at
every precision (556 / 669, 205 / 209, 157 / 170).

RssFile depends on the page cache (how a file's pages sit there when a process maps them), not only
on the process: the same folders measured at 02:46 gave genai 836, 383, 258 and ours 715, 336, 287
(Generator, tokenizer loaded), genai's differences all in `file` (its RssAnon matched to the MB). Compare
sides of one run, never figures of different runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/rss"))
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--runner", default="generator", choices=("generator", "loop"), help="our side (see above)")
    ap.add_argument("--no-genai", action="store_true", help="our side only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--lm-head-bits", type=int, default=None, choices=(4, 8),
                    help="int4's lm_head bits (default: quantize's, 8); 4 as genai's builder writes it (folder -lm4)")
    ap.add_argument("--json", type=Path, default=None, help="also write every profile here")
    args = ap.parse_args()

    from edgellama import folder as model_folder
    from edgellama.check import bench

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for precision in args.precisions.split(","):
        head = 4 if precision == "int4" and args.lm_head_bits == 4 else None
        ours = bench.our_folder(args.source, out, precision=precision, lm_head_bits=head, say=_say)
        prompt = bench.bench_prompt(model_folder.read_manifest(ours).config["vocab_size"], args.prompt_tokens)
        sides = [(f"edgellama {args.runner}", args.runner, ours)]
        if not args.no_genai:
            sides.append(("onnxruntime-genai", "genai", bench.genai_folder(args.source, out, precision=precision,
                                                                           say=_say)))
        print(f"\n== {args.source} {precision}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
              f"batch 1, CPU, {args.threads} threads; MB (rss / anon / file), peak = VmHWM", flush=True)
        for name, runner, folder in sides:
            phases = bench.memory_profile(runner, folder, prompt=prompt, new_tokens=args.new_tokens,
                                          threads=args.threads)
            cells = "  ".join(f"{p}: {m['rss']:.0f} / {m['anon']:.0f} / {m['file']:.0f}" for p, m in phases)
            peak = phases[-1][1]["hwm"]
            shown = precision if folder == ours else bench.builder_precision(precision)
            print(f"{name:<22} {shown:<5} peak {peak:6.0f}   {cells}", flush=True)
            records.append({"side": name, "precision": precision, "folder": str(folder), "peak_mb": peak,
                            "lm_head_bits": head if folder == ours else None,
                            "phases": dict(phases), "prompt_tokens": args.prompt_tokens,
                            "new_tokens": args.new_tokens, "threads": args.threads})
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


def _say(s: str) -> None:
    print(f"[rss] {s}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
