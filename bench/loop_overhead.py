"""What one decode step of our Generator costs beyond the graph, against a bare loop and onnxruntime-genai.

    python bench/loop_overhead.py --out out/loop             # tiny, static KV cache (exported there once)
    python bench/loop_overhead.py --folder out/speed/smollm2-ort-static-fp32
    python bench/loop_overhead.py --out out/loop --threads 1 --rounds 30

Goal (issue 11): on the tiny model, where the graph costs almost nothing, our Generator's decode
step within 1.5x of onnxruntime-genai's on the same static-cache folder (64-token prompt, 32 new
tokens, greedy, end-of-sequence ignored).

Runners, interleaved in rounds in one process (each round runs every runner once):

  generator   one Generator call as generate_ids runs it (a Call: pipeline -> static loop -> ORT run),
              each step timed from one chosen token to the next
  stream      a streaming call driven as the server drives it (take_text after every token): the
              same plus text decoding and the stop-string check
  floor       a minimal hand-written IO-binding loop on the same session: buffers bound once, the
              token written into a bound array, the mask a view of a ones buffer, argmax of the
              bound logits: what a Python loop cannot go below
  genai       onnxruntime-genai's Generator on the same folder (its own session, same thread count)

Per runner and round: the median decode step (the steps after the first token, so a preempted
step does not count); printed: the median over rounds and the best round. Then the same runners
with ONNX Runtime's decode runs replaced by a no-op (the prefill runs, its logits stay bound): the
Python work per step alone, without the graph's time and its threads (load still slows it, floor
and ours alike: compare them within a run). Then five instrumented calls of our Generator (not
mixed into the timings above): the median step and the medians of its parts: ONNX Runtime's run
(Python wrapper and C++), the static cache's bookkeeping around it (StaticCache.step), and the
rest (the loop wrapper, the Call's choice, stop checks and timing); each wrapped timer adds ~0.1 us.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def floor_loop(model, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """(each decode step's seconds, tokens) of the barest static-cache loop on `model`'s session."""
    import onnxruntime as ort

    c, sess = model.config, model.session
    slots = -(-(len(prompt) + new_tokens) // 64) * 64
    b = sess.io_binding()
    keep = []
    for past, present in zip(model.past_names, model.present_names):
        host = np.zeros((1, c.num_key_value_heads, slots, c.head_dim), model.kv_dtype)
        value = ort.OrtValue.ortvalue_from_numpy(host)
        keep += [host, value]
        b.bind_ortvalue_input(past, value)
        b.bind_ortvalue_output(present, value)
    logits = np.zeros((1, 1, c.vocab_size), np.float32)
    b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    ones = np.ones((1, slots), np.int64)
    b.bind_cpu_input("input_ids", np.asarray([prompt], np.int64))
    b.bind_cpu_input("attention_mask", ones[:, :len(prompt)])
    sess.run_with_iobinding(b)
    ids = np.zeros((1, 1), np.int64)
    b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
    tok = int(logits[0, 0].argmax())
    tokens, width, steps = [tok], len(prompt), []
    clock = time.perf_counter
    for _ in range(new_tokens - 1):
        t = clock()
        ids[0, 0] = tok
        width += 1
        b.bind_cpu_input("attention_mask", ones[:, :width])
        sess.run_with_iobinding(b)
        tok = int(logits[0, 0].argmax())
        tokens.append(tok)
        steps.append(clock() - t)
    return steps, tokens


def call_steps(gen, prompt: list[int], new_tokens: int, **options) -> tuple[list[float], list[int]]:
    """(each decode step's seconds, tokens) of one Generator call: what generate_ids runs, its steps
    timed from one chosen token to the next."""
    from edgellama.runtime.call import Call

    call = Call(gen, [list(prompt)], options=gen.options(max_new_tokens=new_tokens, eos=False, **options))
    clock = time.perf_counter
    stamps = [clock() for _ in call.steps()]
    return list(np.diff(stamps)), call.results()[0].token_ids


def breakdown(gen, prompt: list[int], new_tokens: int, rounds: int = 5) -> dict[str, float]:
    """Median microseconds of our Generator's decode step and of its parts: ONNX Runtime's run, the
    static cache's `step` around it, the rest between two cache steps (the loop and the Call's
    pipeline) (timers wrapped around each, ~0.1 us apiece; medians over every step of `rounds`
    calls, so a preempted step does not count)."""
    from edgellama.runtime.static_loop import StaticCache

    session = gen.model.session
    marks: list[tuple[float, float, float, float]] = []
    now: list[float] = []
    clock = time.perf_counter
    run, advance = session.run_with_iobinding, StaticCache.step

    def timed_run(binding, run_options=None):
        if now:
            now.append(clock())
        try:
            return run(binding, run_options)
        finally:
            if now:
                now.append(clock())

    def timed_advance(self, tokens):
        now.append(clock())
        try:
            return advance(self, tokens)
        finally:
            now.append(clock())
            marks.append(tuple(now))
            now.clear()

    session.run_with_iobinding = timed_run      # the instance attribute shadows the method
    StaticCache.step = timed_advance
    try:
        parts: dict[str, list[float]] = {"step": [], "ort": [], "bookkeeping": [], "pipeline": []}
        for _ in range(rounds):
            marks.clear()
            gen.generate_ids(prompt, max_new_tokens=new_tokens, eos=False)
            for (a0, r0, r1, a1), (b0, *_) in zip(marks, marks[1:]):
                parts["step"].append(b0 - a0)
                parts["ort"].append(r1 - r0)
                parts["bookkeeping"].append((a1 - a0) - (r1 - r0))
                parts["pipeline"].append(b0 - a1)
    finally:
        del session.run_with_iobinding
        StaticCache.step = advance
    return {k: statistics.median(v) * 1e6 for k, v in parts.items()}


def python_only(gen, runners: dict, *, rounds: int) -> dict[str, list[float]]:
    """Each runner's median decode step (us) per round with every run after a call's first (its
    prefill) replaced by a no-op: the logits stay the prefill's, so the tokens repeat, and what is
    left is the Python work of a step."""
    session = gen.model.session
    real, runs = session.run_with_iobinding, [0]

    def prefill_only(binding, run_options=None):
        runs[0] += 1
        if runs[0] == 1:
            real(binding, run_options)

    out: dict[str, list[float]] = {k: [] for k in runners}
    session.run_with_iobinding = prefill_only       # the instance attribute shadows the method
    try:
        for _ in range(rounds):
            for k, f in runners.items():
                runs[0] = 0
                out[k].append(statistics.median(f()[0]) * 1e6)
    finally:
        del session.run_with_iobinding
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/loop"), help="where the tiny folder is exported once")
    ap.add_argument("--folder", type=Path, default=None, help="a static-cache folder (default: tiny under --out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-genai", action="store_true")
    args = ap.parse_args()

    from edgellama.check import bench
    from edgellama.runtime.generator import Generator
    from edgellama.runtime.session import OrtModel

    folder = args.folder
    if folder is None:
        folder = args.out / "tiny-ort-static"
        if not (folder / "edgellama.json").is_file():
            from edgellama.export.onnx_export import export_model

            print(f"[loop] exporting tiny to {folder}", file=sys.stderr)
            export_model("tiny", folder, target="ort", kv_cache="static", force=True)
    model = OrtModel(folder, provider="cpu", threads=args.threads)
    gen = Generator(model)
    if gen.loop_mode != "static":
        raise SystemExit(f"{folder} has the dynamic KV cache contract; this bench measures the static loop")
    prompt = bench.bench_prompt(model.config.vocab_size, args.prompt_tokens)
    n = args.new_tokens

    def generator():
        return call_steps(gen, prompt, n)

    def stream():
        clock = time.perf_counter
        s = gen.stream_ids(prompt, max_new_tokens=n, eos=False)
        stamps = [clock() for _ in s.call.steps() if s.call.take_text(0) is not None]
        return list(np.diff(stamps)), s.result.token_ids

    runners = {"generator": generator, "stream": stream, "floor": lambda: floor_loop(model, prompt, n)}
    if not args.no_genai:
        g = bench.GenaiRunner(folder, name="genai", precision=model.manifest.precision, threads=args.threads)

        def genai():
            t = g.run(prompt, n)
            return [s / 1e3 for s in t.step_ms], t.tokens

        runners["genai"] = genai
    for f in runners.values():     # warm-up: first-run allocations, thread pools
        f()
        f()
    steps: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for k, f in runners.items():
            each, tokens[k] = f()
            steps[k].append(statistics.median(each) * 1e6)
    print(f"\n== {folder.name}: {args.prompt_tokens}-token prompt, {n} new tokens, batch 1, greedy, CPU, "
          f"{args.threads} threads, {args.rounds} interleaved rounds: decode step, us")
    print(f"{'runner':<10} {'median':>8} {'best':>8}  tokens = generator's")
    for k in runners:
        print(f"{k:<10} {statistics.median(steps[k]):8.1f} {min(steps[k]):8.1f}  {tokens[k] == tokens['generator']}")
    if "genai" in runners:
        for k in ("generator", "stream", "floor"):
            print(f"{k} / genai: median {statistics.median(steps[k]) / statistics.median(steps['genai']):.2f}x, "
                  f"best {min(steps[k]) / min(steps['genai']):.2f}x")

    python = python_only(gen, {k: runners[k] for k in ("generator", "stream", "floor")}, rounds=args.rounds)
    print("\nPython work per decode step, us (ONNX Runtime's decode runs replaced by a no-op; median / best "
          "over rounds): "
          + ", ".join(f"{k} {statistics.median(v):.2f} / {min(v):.2f}" for k, v in python.items()))

    b = breakdown(gen, prompt, n)
    print(f"\nour step, instrumented, medians over every step of 5 calls, us: {b['step']:.1f} ~ ONNX Runtime run "
          f"{b['ort']:.1f} + the static cache's bookkeeping around it {b['bookkeeping']:.1f} "
          f"+ the rest (loop, Call pipeline) {b['pipeline']:.1f}")


if __name__ == "__main__":
    main()
