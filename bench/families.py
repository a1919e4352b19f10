"""Every model family through the toolkit, measured: one markdown table.

    python bench/families.py                                   # tiny random families + smollm2
    python bench/families.py --shape smollm2 --no-smollm2      # families at SmolLM2-135M's shape
    python bench/families.py --json families.json --markdown families.md

Per family (Qwen2: q/k/v biases; Qwen3: q_norm/k_norm; Mistral: a sliding window; random weights
at torch's default scales, `sources.random_weights`) and smollm2 as the llama row: an HF folder,
the ort export (its default KV cache contract: dynamic for Qwen, static for Llama/Mistral) in fp32,
then int8 and int4 (quant.api.quantize_folder). Quality (check/quality, as bench/quality.py): mean
next-token KL and top-1 agreement against the family's fp32 torch model, teacher-forced windows
(random ids for a random model; standard-library docstrings for smollm2). Speed (check/bench's
runners, as `edgellama bench --against torch`): edgellama's Generator on each folder and
transformers' own class of the family (eager, fp32, the same weights), a fixed prompt, greedy
without early stop, one warm-up each, interleaved runs, medians.
Folders are kept under --out; exports are reused, quantized folders rebuilt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The families' switches; Mistral's window is shorter than prompt + new tokens, so it is exercised.
FAMILIES = {
    "qwen2": {"model_type": "qwen2", "attention_bias": True},
    "qwen3": {"model_type": "qwen3", "qk_norm": True},
    "mistral": {"model_type": "mistral", "sliding_window": 48},
}
# SmolLM2-135M's shape (tied embeddings), for speed figures where the weights, not the Python
# around each step, set the pace.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)
MODES = ("int8", "int4")


def say(text: str) -> None:
    print(f"[families] {text}", file=sys.stderr, flush=True)


def family_source(name: str, out: Path, *, shape: str, seed: int = 7) -> Path:
    """An HF folder of the family: config.json, random weights, tiny's byte-level tokenizer."""
    from safetensors.torch import save_file

    from edgellama.export import config as presets
    from edgellama.export import sources

    # tiny's Qwen3 gets a head_dim apart from hidden/heads (16), as Qwen3's own configs have
    sized = SMOLLM2_SHAPE if shape == "smollm2" else {"head_dim": 32} if name == "qwen3" else {}
    config = presets.tiny(**sized, **FAMILIES[name])
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = sources.random_weights(config, seed=seed)
    for file, text in sources.hf_config_files(config).items():
        (out / file).write_text(text, encoding="utf-8")
    save_file({k: v.contiguous() for k, v in weights.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}, str(out / "model.safetensors"))
    sources.byte_tokenizer(config).save(out)
    return out


def eval_windows(model, tokenizer, *, real_text: bool, tokens: int, window: int):
    import numpy as np

    from edgellama.check import quality

    if real_text:
        ids = quality.eval_tokens(tokenizer, tokens=tokens)
    else:   # a random model predicts nothing of real text; random ids load it as well
        ids = np.random.default_rng(11).integers(3, model.config.vocab_size, size=tokens).tolist()
    return quality.make_windows(ids, window=window, bos_id=tokenizer.bos_token_id if real_text else 1)


def run_model(label: str, source: str, *, args: argparse.Namespace, real_text: bool) -> list[dict]:
    """The rows of one model: fp32 and each mode (quality + our speed), then transformers' speed."""
    import torch

    from edgellama.check import bench, quality
    from edgellama.export.onnx_export import export_model
    from edgellama.export.sources import load_model
    from edgellama.quant.api import quantize_folder

    out = args.out / label
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(source)
    c = model.config
    wins = eval_windows(model, tokenizer, real_text=real_text, tokens=args.tokens, window=args.window)
    ref = quality.evaluate(quality.torch_logits_fn(model), wins, keep_logprobs=True)
    say(f"{label}: torch reference over {ref.scores.tokens} positions")

    fp32 = out / "ort-fp32"
    if args.fresh or not (fp32 / "edgellama.json").is_file():
        t = time.perf_counter()
        export_model(source, fp32, target="ort", dtype="fp32", force=True)
        say(f"{label}: exported in {time.perf_counter() - t:.0f}s")
    folders = {"fp32": fp32}
    for mode in MODES:
        t = time.perf_counter()
        folders[mode] = quantize_folder(fp32, out / f"ort-{mode}", mode=mode, force=True)
        say(f"{label}: {mode} in {time.perf_counter() - t:.0f}s")

    rows = []
    for variant, folder in folders.items():
        fn = quality.ort_logits_fn(folder / "model.onnx", num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                   threads=args.threads)
        s = quality.evaluate(fn, wins, reference=ref.logprobs).scores
        kv = json.loads((folder / "edgellama.json").read_text())["kv_cache"]
        rows.append({"model": label, "variant": f"ort {variant}", "kv_cache": kv, "kl_mean": s.kl_mean, "top1": s.top1,
                     "size_mb": quality.onnx_size(folder) / 1e6})
        say(f"{label}: {variant}: KL {s.kl_mean:.2e} top-1 {s.top1:.3f}")

    runners = [bench.OursRunner(f, threads=args.threads, name=f"ort {v}") for v, f in folders.items()]
    runners.append(bench.TorchRunner(fp32, threads=args.threads, model=bench.transformers_twin(model)))
    del model
    prompt = bench.bench_prompt(c.vocab_size, args.prompt_tokens)
    timed = bench.run_bench(runners, prompt=prompt, new_tokens=args.new_tokens, runs=args.runs,
                            progress=lambda s: say(f"{label}: {s}"))
    torch_tps = timed[-1].decode_tokens_per_s
    for row, t in zip(rows, timed):
        row.update(prefill_ms=t.prefill_ms, decode_tokens_per_s=t.decode_tokens_per_s,
                   vs_transformers=t.decode_tokens_per_s / torch_tps if torch_tps else None)
    rows.append({"model": label, "variant": f"transformers {type(runners[-1].model).__name__} fp32",
                 "kv_cache": "DynamicCache", "kl_mean": None, "top1": None, "size_mb": timed[-1].weight_bytes / 1e6,
                 "prefill_ms": timed[-1].prefill_ms, "decode_tokens_per_s": torch_tps, "vs_transformers": 1.0})
    return rows


def markdown(rows: list[dict], *, header: str) -> str:
    lines = [header, "", "| model | variant | KV cache | MB | mean KL vs torch fp32 | top-1 | prefill ms | decode tok/s "
             "| vs transformers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | |")
            continue
        kl = "—" if r["kl_mean"] is None else f"{r['kl_mean']:.2e}"
        top1 = "—" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
        lines.append(f"| {r['model']} | {r['variant']} | {r['kv_cache']} | {r['size_mb']:.2f} | {kl} | {top1} | "
                     f"{r['prefill_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['vs_transformers']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
    ap.add_argument("--shape", default="tiny", choices=("tiny", "smollm2"), help="the random families' shape")
    ap.add_argument("--no-smollm2", action="store_true", help="leave out the smollm2 (llama) row")
    ap.add_argument("--tokens", type=int, default=512, help="evaluation tokens per model")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/families"))
    ap.add_argument("--fresh", action="store_true", help="redo the HF folders and exports too")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"families: error: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")

    models = [(f"{n} ({args.shape})", n) for n in names] + ([] if args.no_smollm2 else [("smollm2 (llama)", None)])
    rows = []
    for label, name in models:
        t = time.perf_counter()
        try:
            if name is None:
                rows += run_model(label, "smollm2", args=args, real_text=True)
            else:
                src = args.out / label / "hf"
                if args.fresh and src.exists():
                    import shutil

                    shutil.rmtree(src)
                rows += run_model(label, str(family_source(name, src, shape=args.shape)), args=args, real_text=False)
        except Exception as e:  # noqa: BLE001 - one family's failure must not lose the others' rows
            rows.append({"model": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            say(f"{label}: {rows[-1]['error']}")
        say(f"{label}: {time.perf_counter() - t:.0f}s")
    command = "python bench/families.py " + " ".join(sys.argv[1:])
    header = (f"`{command.strip()}`: {args.tokens} evaluation tokens in windows of {args.window}, prompt "
              f"{args.prompt_tokens} tokens, {args.new_tokens} new, {args.runs} runs, {args.threads} threads")
    table = markdown(rows, header=header)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
