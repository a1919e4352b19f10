"""Generate text with an exported model folder on ONNX Runtime, streaming it to stdout.

MODEL is a folder written by `edgellama export` or `edgellama quantize`. Greedy by default;
--temperature > 0 samples (with --top-k / --top-p, reproducible with --seed). --chat wraps the
prompt in the model's chat template. --stop S ends the answer before the first S (repeatable;
never printed), --repetition-penalty R as transformers applies it, --logprobs K reports each
token's log-probability and the K most likely ones (in --json). --json-schema FILE or --regex R
constrain the output. --speculative prompt-lookup (or a draft model folder) decodes several
tokens per forward pass with the same output as without it. Options left out come from the folder's generation_config.json when it has
one. --prompt-ids 1,2,3 gives token ids instead of text (a folder without a tokenizer then prints
the new ids). --json prints one JSON object (schema edgellama.generate) instead of streaming: text,
token_ids, prompt_tokens, finish_reason, stop_reason, logprobs, capped, prefill_ms, decode_ms,
decode_tokens_per_s, provider.
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
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text ('-' reads it from stdin)")
    src.add_argument("--prompt-ids", metavar="IDS", help="the prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_generation_arguments(p, max_new_tokens=128)
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="report each token's logprob and the K most likely (with --json)")
    p.add_argument("--json-schema", type=Path, default=None, metavar="FILE", help="constrain the output to this schema")
    p.add_argument("--regex", default=None, metavar="R", help="constrain the output to this regular expression")
    p.add_argument("--speculative", default=None, metavar="DRAFT",
                   help="exact speculative decoding (static-cache folders, one prompt): 'prompt-lookup', or a "
                        "draft model folder of the same vocabulary (e.g. an int4 export of the same model)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def add_generation_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The provider and sampling flags `generate` and `chat` share (read back by `options`)."""
    p.add_argument("--provider", default="auto", choices=PROVIDERS)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy (default, unless the folder's generation_config.json samples)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", action="append", default=None, metavar="S", help="stop string (repeatable)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="1.0 = off")


def options(args: argparse.Namespace) -> dict:
    """The GenerationOptions keyword arguments of the shared flags (`edgellama chat` takes them too)."""
    schema = None
    if getattr(args, "json_schema", None) is not None:
        from edgellama.folder import read_json

        schema = read_json(args.json_schema, error=RuntimeInputError, bad="not a readable JSON schema")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop, eos=not args.no_eos,
                repetition_penalty=args.repetition_penalty, logprobs=getattr(args, "logprobs", None),
                json_schema=schema, regex=getattr(args, "regex", None))


def run(args: argparse.Namespace) -> int:
    from edgellama.cli.output import print_json
    from edgellama.runtime.generator import Generator

    kwargs = options(args)
    ids = _prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    if ids is not None and args.chat:
        raise RuntimeInputError("--chat renders text with the chat template; --prompt-ids are already tokens")
    prompt = None if ids is not None else (_stdin_text() if args.prompt == "-" else args.prompt)
    gen = Generator(args.model, provider=args.provider, threads=args.threads)
    opts = gen.options(**kwargs)
    spec = {"speculative": args.speculative} if args.speculative else {}
    if args.json:
        result = (gen.generate_ids(ids, options=opts, **spec)[0] if ids is not None
                  else gen.generate(prompt, chat=args.chat, options=opts, **spec))
        print_json("generate", {**result.to_dict(), "provider": gen.model.provider})
        return 0
    if ids is not None and gen.tokenizer_or_none is None:
        result = gen.generate_ids(ids, options=opts, **spec)[0]
        print(",".join(map(str, result.token_ids)))
        return 0
    stream = (gen.stream_ids(ids, options=opts, **spec) if ids is not None
              else gen.stream(prompt, chat=args.chat, options=opts, **spec))
    with stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise RuntimeInputError(f"--prompt-ids takes comma-separated token ids, got {text!r}") from None
    if not ids:
        raise RuntimeInputError("--prompt-ids is empty: give at least one token id")
    return ids


def _stdin_text() -> str:
    # Bytes, decoded here: the text layer's errors= depends on the locale (surrogateescape under C).
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuntimeInputError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None
