"""Generate text with an exported model folder on ONNX Runtime, streaming it to stdout.

MODEL is a folder written by `edgellama export` or `edgellama quantize`. Greedy by default;
--temperature > 0 samples (with --top-k / --top-p, reproducible with --seed). --chat wraps the
prompt in the model's chat template. --json prints one JSON object instead of streaming: text,
token_ids, prompt_tokens, finish_reason, prefill_ms, decode_ms, decode_tokens_per_s, provider.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgellama.errors import RuntimeInputError
from edgellama.runtime.session import PROVIDERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--provider", default="auto", choices=PROVIDERS)
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run(args: argparse.Namespace) -> int:
    from edgellama.runtime.generator import Generator

    prompt = _stdin_text() if args.prompt == "-" else args.prompt
    gen = Generator(args.model, provider=args.provider, threads=args.threads)
    kwargs = dict(chat=args.chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.json:
        result = gen.generate(prompt, **kwargs)
        print(json.dumps({**result.to_dict(), "provider": gen.model.provider}, ensure_ascii=False))
        return 0
    for piece in gen.stream(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _stdin_text() -> str:
    # Bytes, decoded here: the text layer's errors= depends on the locale (surrogateescape under C).
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuntimeInputError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None
