"""Quantization quality on a real model against fp32 torch: one table per model.

    python bench/quality.py --degrid --genai                       # smollm2 and its de-gridded copy
    python bench/quality.py --modes int4 --tokens 4096 --window 512 --json q.json --markdown q.md

Text: the docstrings of a fixed list of standard-library modules (edgellama.check.quality),
the first --tokens tokens, in non-overlapping windows of --window tokens each starting with BOS;
one teacher-forced prefill per window. P is the source's fp32 torch model; each row is our fp32
ONNX export on ONNX Runtime CPU, each quantization mode (edgellama.quant.api.quantize_folder),
and with --genai onnxruntime-genai's model builder (-p int8, -p int4) on the same checkpoint.
--degrid adds the same table for a copy whose weights are moved off the GGUF's Q4_1/Q8_0 grid
(U(-d/2, d/2) per weight), whose own fp32 torch perplexity is its baseline.
Folders are kept under --out; exports and builder outputs are reused, quantized folders are
rebuilt each run (they are what is being measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path


def say(text: str) -> None:
    print(f"[quality] {text}", file=sys.stderr, flush=True)


def run_model(name: str, source: str, *, args: argparse.Namespace, hf_folder: Path | None) -> dict:
    """Every row of one model's table (a dict per row), the torch reference first."""
    import torch

    from edgellama.check import quality
    from edgellama.export.onnx_export import export_model
    from edgellama.export.sources import load_model, save_hf_folder
    from edgellama.progress import Progress
    from edgellama.quant.api import quantize_folder

    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(source)
    config = model.config
    ids = quality.eval_tokens(tokenizer, tokens=args.tokens)
    windows = quality.make_windows(ids, window=args.window, bos_id=tokenizer.bos_token_id)
    say(f"{name}: {len(ids)} tokens in {len(windows)} windows of <= {args.window}")
    fn = quality.torch_logits_fn(model)
    ref = quality.evaluate(fn, windows, keep_logprobs=True, progress=Progress())
    rows = [{"variant": "fp32 torch (P)", "size": None, "seconds": time.perf_counter() - t0,
             "answer": quality.france_answer(fn, tokenizer), **ref.scores.to_dict()}]
    say(f"{name}: torch ppl {ref.scores.ppl:.4f}")
    del model, fn
    gc.collect()

    def measure(variant: str, folder: Path) -> None:
        t = time.perf_counter()
        try:
            fn = quality.ort_logits_fn(folder / "model.onnx", num_kv_heads=config.num_key_value_heads,
                                       head_dim=config.head_dim, threads=args.threads)
            got = quality.evaluate(fn, windows, reference=ref.logprobs, progress=Progress())
            row = {"variant": variant, "size": quality.onnx_size(folder),
                   "answer": quality.france_answer(fn, tokenizer), **got.scores.to_dict()}
        except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others' rows
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        say(f"{name}: {variant}: " + (f"ppl {row['ppl']:.4f} KL {row['kl_mean']:.2e} top1 {row['top1']:.4f}"
                                      if "error" not in row else row["error"]))

    fp32 = out / f"{args.target}-fp32"
    if args.fresh or not (fp32 / "edgellama.json").is_file():
        say(f"{name}: exporting ({args.target}, fp32)")
        export_model(source, fp32, target=args.target, dtype="fp32", force=True)
    measure(f"fp32 ONNX ({args.target})", fp32)

    for mode in [m for m in args.modes.split(",") if m]:
        folder = out / f"{args.target}-{mode}"
        t = time.perf_counter()
        try:
            quantize_folder(fp32, folder, mode=mode, force=True)
        except Exception as e:  # noqa: BLE001 - report it in the row and go on
            rows.append({"variant": mode, "error": f"quantize: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            say(f"{name}: {mode}: quantize failed: {e}")
            continue
        say(f"{name}: quantized {mode} in {time.perf_counter() - t:.0f}s")
        measure(mode, folder)

    if args.genai:
        from edgellama.check.bench import build_genai_model

        if hf_folder is None:
            hf_folder = out / "hf"
            if args.fresh or not (hf_folder / "config.json").is_file():
                save_hf_folder(source, hf_folder)
        for precision in ("int8", "int4"):
            built = out / f"genai-{precision}"
            if args.fresh and built.exists():
                shutil.rmtree(built)
            say(f"{name}: onnxruntime-genai builder -p {precision}")
            try:
                build_genai_model(hf_folder, built, precision=precision)
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": f"genai builder {precision}", "error": str(e)})
                continue
            measure(f"genai builder {precision}", built)

    base, size = rows[0]["ppl"], rows[1].get("size")
    for row in rows:
        if "ppl" in row:
            row["ppl_change"] = row["ppl"] / base - 1.0
        if row.get("size") and size:
            row["size_ratio"] = row["size"] / size
        if "answer" in row:
            row["paris"] = "Paris" in row["answer"]
    return {"model": name, "source": info, "tokens": ref.scores.tokens, "windows": len(windows),
            "window": args.window, "text_sha256": _sha(ids), "rows": rows}


def _sha(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def markdown(result: dict) -> str:
    lines = [f"### {result['model']} ({result['tokens']} tokens, {result['windows']} windows of "
             f"<= {result['window']}, text ids sha256 {result['text_sha256']})", "",
             "| variant | ppl | Δppl | mean KL | top-1 | size MB | size vs fp32 | Paris | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | | | | |")
            continue
        kl = "—" if r.get("kl_mean") is None else f"{r['kl_mean']:.2e}"
        top1 = "—" if r.get("top1") is None else f"{100 * r['top1']:.2f}%"
        size = "—" if not r.get("size") else f"{r['size'] / 1e6:.1f}"
        ratio = "—" if not r.get("size_ratio") else f"{r['size_ratio']:.3f}x"
        lines.append(f"| {r['variant']} | {r['ppl']:.4f} | {100 * r['ppl_change']:+.2f}% | {kl} | {top1} | "
                     f"{size} | {ratio} | {'yes' if r['paris'] else 'no: ' + repr(r['answer'][:40])} | "
                     f"{r['seconds']:.0f} |")
    goals = goal_lines(result)
    return "\n".join(lines + ([""] + goals if goals else [])) + "\n"


# The goals (issue 4, "Quality"): (mode, description, check(row, rows by variant)).
GOALS = (
    ("fp16", "top-1 >= 99.5% and KL <= 1e-3", lambda r, _: r["top1"] >= 0.995 and r["kl_mean"] <= 1e-3),
    ("int8", "ppl within +0.3%, KL <= 2e-3, top-1 >= 97.5%, size <= 0.30x",
     lambda r, _: r["ppl_change"] <= 0.003 and r["kl_mean"] <= 2e-3 and r["top1"] >= 0.975 and r["size_ratio"] <= 0.30),
    ("int8-dynamic", "ppl within +2%", lambda r, _: r["ppl_change"] <= 0.02),
    ("int4", "size <= 0.20x", lambda r, _: r["size_ratio"] <= 0.20),
    ("int4", "mean KL <= genai int4's / 3 at equal or smaller size",
     lambda r, by: r["kl_mean"] * 3 <= by["genai builder int4"]["kl_mean"]
     and r["size"] <= by["genai builder int4"]["size"]),
)


def goal_lines(result: dict) -> list[str]:
    """One line per goal whose rows this run measured: met / missed, with the figures behind it."""
    by = {r["variant"]: r for r in result["rows"] if "error" not in r and "ppl" in r}
    lines = []
    for mode, text, check in GOALS:
        if mode not in by or ("genai" in text and "genai builder int4" not in by):
            continue
        r = by[mode]
        try:
            ok = check(r, by)
        except (KeyError, TypeError):
            continue
        lines.append(f"- {result['model']} {mode}: {text}: {'met' if ok else 'MISSED'} "
                     f"(ppl {100 * r['ppl_change']:+.2f}%, KL {r['kl_mean']:.2e}, top-1 {100 * r['top1']:.2f}%, "
                     f"size {r.get('size_ratio', float('nan')):.3f}x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2", help="smollm2, a .gguf file or an HF folder")
    ap.add_argument("--modes", default="fp16,int8,int8-dynamic,int4", help="comma-separated; '' for none")
    ap.add_argument("--degrid", action="store_true", help="also the de-gridded copy (GGUF sources only)")
    ap.add_argument("--genai", action="store_true", help="also onnxruntime-genai's model builder int8/int4")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--target", default="ort", help="export target the modes quantize (portable, ort, onnx23)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the de-grid noise seed")
    ap.add_argument("--out", type=Path, default=Path("out/quality"))
    ap.add_argument("--fresh", action="store_true", help="redo exports and builder outputs too")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--render", type=Path, default=None, help="only print the tables of a saved --json file")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        print(f"`{saved['command']}`\n\n" + "\n".join(markdown(r) for r in saved["results"]), end="")
        return

    from edgellama.export.sources import smollm2_path
    from edgellama.check import quality

    start = time.perf_counter()
    models = [(args.source, args.source, None)]
    if args.degrid:
        gguf = smollm2_path() if args.source == "smollm2" else Path(args.source)
        if gguf.suffix.lower() != ".gguf":
            ap.error("--degrid needs a GGUF source (smollm2 or a .gguf file)")
        folder = args.out / f"{Path(args.source).stem}-degrid-hf"
        if args.fresh or not (folder / "config.json").is_file():
            say(f"writing the de-gridded copy to {folder}")
            quality.degrid_gguf(gguf, folder, seed=args.seed)
        models.append((f"{Path(args.source).stem}-degrid", str(folder), folder))
    results = []
    for name, source, hf in models:
        results.append(run_model(Path(name).stem, source, args=args, hf_folder=hf))
        print(markdown(results[-1]), flush=True)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    text = f"`{command}` ({time.perf_counter() - start:.0f} s)\n\n" + "\n".join(markdown(r) for r in results)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
