"""A Hugging Face checkpoint folder: config.json, safetensors weights (one file or sharded), tokenizer.

Reference: what transformers' `LlamaForCausalLM.from_pretrained(folder)` reads. Only safetensors:
a pickled checkpoint (`.bin`, `.pt`, ...) can run code when loaded, so it is refused unread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellama.errors import ConfigError, SourceError
from edgellama.export.config import LlamaConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def refuse_pickle(path: Path) -> SourceError:
    return SourceError(f"{path}: refusing to unpickle a PyTorch checkpoint (it can run arbitrary code); "
                       "convert it to safetensors")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the index's shards, model.safetensors, or every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SourceError(f"{folder}: shards named in {INDEX_FILE} are missing: {', '.join(missing[:5])}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    raise SourceError(f"{folder}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json; a Hugging Face checkpoint folder has config.json "
                          "and safetensors weights")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: not a config object")
    try:
        return LlamaConfig.from_hf(raw)
    except ConfigError as e:
        raise SourceError(f"{path}: {e}") from None
    except TypeError as e:  # a field of the wrong type (a list where an int belongs)
        raise SourceError(f"{path}: malformed config ({e})") from None


def read_weights(files: list[Path]) -> dict[str, Any]:
    """Every tensor of the files as fp32 torch tensors, under its checkpoint name."""
    import torch
    from safetensors import SafetensorError, safe_open

    out: dict[str, Any] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in out:
                        raise SourceError(f"{path}: tensor {name} appears in two shards")
                    out[name] = f.get_tensor(name).to(torch.float32)
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer.json (token ids still work)."""
    from edgellama.tokenizer import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_folder(folder)


def read_hf_folder(folder: Path) -> tuple[LlamaConfig, dict[str, Any], Any, list[Path]]:
    """(config, {name: fp32 tensor}, Tokenizer or None, the files the weights came from)."""
    config = read_config(folder)
    files = weight_files(folder)
    weights = read_weights(files)
    # transformers < 4.31 saved the rotary table as a buffer; it is derived from the config again
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    return config, weights, read_tokenizer(folder), files
