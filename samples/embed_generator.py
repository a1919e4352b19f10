"""Embedding edgellama's Generator in an application: load a model folder once, stream chat answers.

    edgellama export smollm2 -o out/smollm2
    python samples/embed_generator.py out/smollm2 "What is the capital of France?"

One Generator serves every request (and several threads at once); each call keeps its own KV cache.
"""

import sys

from edgellama.errors import EdgellamaError
from edgellama.runtime.generator import Generator


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    folder = sys.argv[1]
    question = sys.argv[2] if len(sys.argv) > 2 else "Give me three tips for writing clear code."
    try:
        gen = Generator(folder, provider="auto")       # CUDA when it can start here, else the CPU
        stream = gen.stream(question, chat=True, max_new_tokens=128)
        for piece in stream:
            print(piece, end="", flush=True)
    except EdgellamaError as e:                         # bad folder, bad prompt, provider missing: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = stream.result
    print(f"\n[{len(r.token_ids)} tokens, prefill {r.prefill_ms:.0f} ms, {r.decode_tokens_per_s:.1f} tokens/s, "
          f"{gen.model.provider}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
