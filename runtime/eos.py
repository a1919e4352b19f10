"""The end-of-sequence id a folder's tokenizer names, read from its files without loading the tokenizer.

A Generator stops on the config's eos ids, generation_config.json's, and the tokenizer's own
`eos_token_id` (tokenizer_config.json's `eos_token`, looked up as `tokenizers`' `token_to_id`
does). Loading the `tokenizers` library and the folder's BPE only to learn that one id cost a
generating process about 42 MB of resident memory (issue 11's memory goal), so a Generator given
and asked for token ids never loads it: `tokenizer_eos_id` reads tokenizer_config.json and only
the `added_tokens` list at the head of tokenizer.json (where a special token such as `<|im_end|>`
is), stopping before the vocabulary and merges.

Whatever the files do not say plainly (the eos token not among the added tokens, or listed twice,
an unreadable file, tokenizer.json written with its model before its added tokens) raises
`Undecided`, and the caller asks the tokenizer itself, as before: the answer is the id
`Tokenizer.from_folder(folder).eos_token_id` gives, or None where that tokenizer has none or cannot
be loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgellama.folder import inside, read_json
from edgellama.tokenizer import CONFIG_FILE, TEMPLATE_FILE, TOKENIZER_FILE

_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 16          # tokenizer.json is read this many characters at a time, until its added tokens end


class Undecided(Exception):
    """The files do not say the id plainly: load the tokenizer to learn it."""


def tokenizer_eos_id(folder: str | Path) -> int | None:
    """The id of the folder's tokenizer's eos token, None where it names none (Undecided: ask the tokenizer)."""
    folder = Path(folder)
    try:
        path, config_path, template_path = (inside(folder, name, what="tokenizer file", hub_cache=True)
                                            for name in (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE))
        if not path.is_file():
            return None                       # no tokenizer at all: it names no eos token
        config: Any = read_json(config_path) if config_path.is_file() else {}
        if template_path.is_file():
            template_path.read_text(encoding="utf-8")   # Tokenizer.from_folder refuses a folder whose template is unreadable
    except Exception as e:  # noqa: BLE001 - whatever from_folder would make of it, it decides
        raise Undecided(str(e)) from None
    if not isinstance(config, dict):
        raise Undecided(f"{config_path}: not a JSON object")
    text = config.get("eos_token")
    text = text.get("content") if isinstance(text, dict) else (text if isinstance(text, str) else None)
    if text is None:
        return None                           # Tokenizer.eos_token_id: no eos token named
    if not isinstance(text, str):
        raise Undecided(f"{config_path}: eos_token {text!r}")
    ids = [t.get("id") for t in _added_tokens(path) if isinstance(t, dict) and t.get("content") == text]
    if len(ids) != 1 or not isinstance(ids[0], int) or isinstance(ids[0], bool) or ids[0] < 0:
        raise Undecided(f"{path}: {text!r} is not one added token")
    return ids[0]


def _added_tokens(path: Path) -> list:
    """tokenizer.json's `added_tokens`, parsed from the head of the file (read a chunk at a time)."""
    try:
        with open(path, encoding="utf-8") as f:
            head, size = "", _CHUNK
            while True:
                more = f.read(size)
                head += more
                found = _added_tokens_in(head)
                if found is not None:
                    return found
                if not more:
                    raise Undecided(f"{path}: no added_tokens before the model")
                size *= 2
    except (OSError, ValueError, RecursionError) as e:
        raise Undecided(f"{path}: {e}") from None


def _added_tokens_in(head: str) -> list | None:
    """The `added_tokens` value of the JSON object `head` begins, None while `head` ends before it.
    The top-level keys before it are parsed one by one; reaching `model` (the vocabulary and
    merges, the bulk of the file) first is Undecided, as is anything not JSON."""
    decoder = json.JSONDecoder()
    try:
        i = _SPACE.match(head, 0).end()
        if head[i:i + 1] != "{":
            return None if i == len(head) else _refuse("not a JSON object")
        i += 1
        while True:
            i = _SPACE.match(head, i).end()
            if head[i:i + 1] == "}":
                raise Undecided("no added_tokens")
            key, i = decoder.raw_decode(head, i)
            i = _SPACE.match(head, i).end()
            if not isinstance(key, str) or head[i:i + 1] != ":":
                return None if i >= len(head) else _refuse("not a JSON object")
            if key == "model":
                raise Undecided("the model before added_tokens")
            value, i = decoder.raw_decode(head, _SPACE.match(head, i + 1).end())
            if key == "added_tokens":
                return value if isinstance(value, list) else _refuse("added_tokens is not a list")
            i = _SPACE.match(head, i).end()
            if head[i:i + 1] == ",":
                i += 1
            elif i >= len(head):
                return None
            else:
                return _refuse("not a JSON object")
    except (json.JSONDecodeError, IndexError):
        return None        # cut short (read more); a real error shows once the whole file is read


def _refuse(why: str) -> Any:
    raise Undecided(why)
