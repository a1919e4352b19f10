"""Constrained output on smollm2: what the llguidance mask costs per token, and whether sampled
output always follows the schema.

    python bench/constraints.py --out out/constraints              # exports smollm2 there once
    python bench/constraints.py --folder out/smollm2 --runs 50

Each run is one chat prompt, sampled at temperature 1.0 (seed = run number) under a JSON schema
({name: string <= 20 chars, age: integer 0..120}), driven step by step through runtime/kv_loop.py:
forward -> mask -> sample -> accept. Per token it times the forward pass (the decode step), the
wait in `allowed()` plus setting the disallowed logits to -inf, and `accept()`.

Two orders are measured:
  overlapped  accept, then forward, then allowed(): the mask of the next step is computed on
              runtime/constraints.py's worker thread while the model runs (llguidance releases the GIL)
  serial      accept, then allowed() at once, then forward: the whole mask computation is paid inline

The validity count is over the overlapped runs (every output parsed by json.loads and validated by
jsonschema), then over --runs more through Generator.generate(json_schema=), the API's own loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
PROMPT = "Describe a person as JSON with a name and an age."


def say(s: str) -> None:
    print(f"[constraints] {s}", file=sys.stderr, flush=True)


def run_once(gen, prompt_ids, *, seed: int, max_new: int, overlapped: bool) -> tuple[str, dict[str, list[float]]]:
    """One sampled constrained generation; its text and per-token timings (seconds)."""
    from edgellama.runtime import kv_loop
    from edgellama.runtime.constraints import build_constraint
    from edgellama.runtime.sampling import SamplingParams, next_tokens

    params, rng = SamplingParams(temperature=1.0), np.random.default_rng(seed)
    c = build_constraint(tokenizer=gen.tokenizer, vocab_size=gen.config.vocab_size, eos_ids=sorted(gen.stop_ids),
                         json_schema=SCHEMA)
    loop = kv_loop.make_loop(gen.model, 1, mode=gen.loop_mode, capacity=len(prompt_ids) + max_new)
    ids = np.array([prompt_ids], np.int64)
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
    times: dict[str, list[float]] = {"forward": [], "mask": [], "accept": []}
    out: list[int] = []
    allowed = None
    for step in range(max_new):
        t0 = time.perf_counter()
        logits = loop.step(ids, mask, pos)[0].copy()
        t1 = time.perf_counter()
        if allowed is None:
            allowed = c.allowed()
        logits[~allowed] = -np.inf
        t2 = time.perf_counter()
        token = int(next_tokens(logits[None], params, rng)[0])
        t3 = time.perf_counter()
        c.accept(token)
        allowed = None if overlapped else c.allowed()
        t4 = time.perf_counter()
        if step:   # the first forward is the prefill
            times["forward"].append(t1 - t0)
            times["mask"].append(t2 - t1)
            times["accept"].append(t4 - t3)
        if token in gen.stop_ids:
            break
        out.append(token)
        ids, pos = np.array([[token]], np.int64), pos[:, -1:] + 1
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return gen.decode(out), times


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    step = statistics.median(times["forward"])
    cost = [m + a for m, a in zip(times["mask"], times["accept"])]
    return {"tokens": len(cost), "step_ms": step * 1e3,
            "mask_ms_median": statistics.median(times["mask"]) * 1e3,
            "accept_ms_median": statistics.median(times["accept"]) * 1e3,
            "cost_ms_median": statistics.median(cost) * 1e3, "cost_ms_mean": statistics.fmean(cost) * 1e3,
            "cost_over_step_median": statistics.median(cost) / step,
            "cost_over_step_mean": statistics.fmean(cost) / statistics.fmean(times["forward"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/constraints"))
    ap.add_argument("--folder", type=Path, default=None, help="a smollm2 folder (else exported under --out)")
    ap.add_argument("--kv-cache", default=None, help="with the export: static | dynamic (default: the target's)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--serial-runs", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from edgellama.runtime.generator import Generator

    folder = args.folder
    if folder is None:
        folder = args.out / "smollm2"
        if not (folder / "edgellama.json").is_file():
            from edgellama.export.onnx_export import export_model

            say(f"exporting smollm2 to {folder}")
            export_model("smollm2", folder, target="ort", kv_cache=args.kv_cache, force=True)
    gen = Generator(folder, provider="cpu", threads=args.threads)
    prompt_ids = gen.encode(PROMPT, chat=True)
    figures: dict = {"folder": str(folder), "loop": gen.loop_mode, "prompt_tokens": len(prompt_ids)}

    for order, runs in (("overlapped", args.runs), ("serial", args.serial_runs)):
        merged: dict[str, list[float]] = {"forward": [], "mask": [], "accept": []}
        ok, texts = 0, []
        for seed in range(runs):
            text, times = run_once(gen, prompt_ids, seed=seed, max_new=args.max_new_tokens, overlapped=order == "overlapped")
            for k in merged:
                merged[k] += times[k]
            ok += valid(text)
            texts.append(text)
        figures[order] = {"runs": runs, "valid": ok, **summarize(merged), "examples": texts[:3]}
        say(f"{order}: {figures[order]}")

    results = [gen.generate(PROMPT, chat=True, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=s,
                            json_schema=SCHEMA) for s in range(args.runs)]
    figures["generator"] = {"runs": args.runs, "valid": sum(valid(r.text) for r in results),
                            "finished": sum(r.finish_reason == "stop" for r in results),
                            "examples": [r.text for r in results[:3]]}
    say(f"Generator.generate(json_schema=): {figures['generator']}")

    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
