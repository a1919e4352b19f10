"""Chat sessions' goal (issue 14): the second turn's prefill on a ~300-token history is at most 0.3x a
full re-prefill of the same conversation, with the same output.

    python bench/chat.py --out out/chat            # smollm2, ort (static KV cache), CPU
    python bench/chat.py --out out/chat --kv-cache dynamic

Per run: a fresh ChatSession sends a first message (a long passage, greedy reply) so that the
history is about 300 tokens, then a short second message; the reference is `Generator.generate`
of the same conversation from nothing. Prints each run's two prefill times, the median ratio and
whether the greedy outputs were identical. The model folder is kept under --out.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

PASSAGE = ("The lighthouse keeper kept a log of every ship that passed the point, the weather at dawn and at "
           "dusk, and the state of the lamp. In the winter of the great storm the log grew to three volumes: "
           "the wind took the roof of the oil store, the supply boat could not land for nineteen days, and the "
           "keeper rationed the paraffin by burning the lamp at half height on clear nights. When the boat "
           "finally came, the crew found the log written in pencil, the ink having frozen in its bottle, and "
           "every entry signed. The harbour board later printed the three volumes as a pamphlet, which is how "
           "the story of the storm reached the town, and how the keeper came to be asked, every winter after, "
           "to tell it again at the harbour inn. He always began with the weather at dawn, went on to the "
           "nineteen days without the boat, and ended, whatever the company, with the frozen ink: the detail "
           "that, he said, nobody in the town had ever believed until they saw the pencil for themselves. ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/chat"))
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--kv-cache", default=None, choices=["static", "dynamic"])
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reply-tokens", type=int, default=48)
    args = ap.parse_args()

    from edgellama.export.onnx_export import export_model
    from edgellama.runtime import ChatSession, Generator

    folder = args.out / f"{args.source}-{args.kv_cache or 'default'}"
    if not (folder / "edgellama.json").exists():
        export_model(args.source, folder, target="ort", kv_cache=args.kv_cache, force=True)
    gen = Generator(folder, provider=args.provider, threads=args.threads)
    first = f"Read this and summarise it in two sentences.\n\n{PASSAGE}"
    second = "Why did the keeper burn the lamp at half height?"
    gen.generate(first, chat=True, max_new_tokens=4)               # warm-up: session, allocator, caches
    rows = []
    for _ in range(args.runs):
        chat = ChatSession(gen, system="You are a helpful assistant.")
        chat.send(first, max_new_tokens=args.reply_tokens)
        history = chat.cached_tokens
        convo = [*chat.messages, {"role": "user", "content": second}]
        turn = chat.send(second, max_new_tokens=args.reply_tokens)
        full = gen.generate(convo, chat=True, max_new_tokens=args.reply_tokens)
        rows.append((history, turn, full))
        print(f"history {history} tokens, turn 2 prompt {turn.prompt_tokens} (prefilled {turn.prefill_tokens}): "
              f"session prefill {turn.prefill_ms:.1f} ms, full re-prefill {full.prefill_ms:.1f} ms, "
              f"ratio {turn.prefill_ms / full.prefill_ms:.3f}, identical {turn.token_ids == full.token_ids}"
              + (f", reprefill: {turn.reprefill_reason}" if turn.reprefill_reason else ""))
    ratio = statistics.median(t.prefill_ms / f.prefill_ms for _, t, f in rows)
    same = all(t.token_ids == f.token_ids for _, t, f in rows)
    print(f"{args.source} ({gen.loop_mode} loop, {gen.model.provider}, {args.threads} threads): second-turn prefill / "
          f"full re-prefill = {ratio:.3f} (median of {len(rows)}; goal <= 0.3); outputs identical: {same}")


if __name__ == "__main__":
    main()
