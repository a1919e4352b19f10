"""A Hugging Face checkpoint folder: config.json, safetensors weights (one file or sharded), tokenizer.

Reference: what transformers' `LlamaForCausalLM.from_pretrained(folder)` reads. Only safetensors:
a pickled checkpoint (`.bin`, `.pt`, ...) can run code when loaded, so it is refused unread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgellama.errors import ConfigError, ModelFolderError, SourceError
from edgellama.export.config import LlamaConfig, check_shapes
from edgellama.folder import inside, read_json

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
        files = [shard_path(folder, name) for name in sorted(read_index(index))]
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


def read_index(index: Path) -> set[str]:
    """The shard file names of a sharded checkpoint's index, type-checked."""
    data = read_json(index, error=SourceError, bad="not a safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index}: not a safetensors index (no 'weight_map' object)")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{index}: not a safetensors index (a 'weight_map' entry is not a file name)")
    return set(weight_map.values())


def shard_path(folder: Path, name: str) -> Path:
    """A shard the index names, resolved (symlinks included) and refused unless it stays inside the
    folder: the index is untrusted, and nothing outside is opened or stat'ed.

    One exception keeps Hugging Face's cache working: its snapshot folders hold symlinks into the
    repository's blobs/ folder, so a snapshot's shard may resolve there (the name itself must still
    be a plain path inside the snapshot)."""
    try:
        return inside(folder, name, what="shard", hub_cache=True)
    except ModelFolderError as e:
        raise SourceError(str(e)) from None


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json; a Hugging Face checkpoint folder has config.json "
                          "and safetensors weights")
    raw = read_json(path, error=SourceError, bad="not valid JSON")
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: not a config object")
    try:
        return LlamaConfig.from_hf(raw)
    except ConfigError as e:
        raise SourceError(f"{path}: {e}") from None


# Floating-point safetensors dtypes; an integer or bool tensor is no weight of a Llama.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{name: (file, dtype, shape)} from the files' headers: no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in out:
                        raise SourceError(f"{path}: tensor {name} appears in two shards")
                    piece = f.get_slice(name)
                    out[name] = (path, piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    return out


# Rows converted per reopening of a shard: a 128k-row embedding is read in pieces of about this
# many bytes, so no tensor is ever held twice (source dtype and target dtype) in full.
CHUNK_BYTES = 64 << 20


class SafetensorsWeights:
    """The tensors of checked safetensors headers, read one at a time into a torch dtype.

    Every read opens the shard again (memory-mapped by safe_open), converts a block of rows and
    closes it: the file's pages never stay mapped into this process between reads, and a shard
    changed after its header was checked (truncated, rewritten with another dtype or shape) is
    found by that reopen as one SourceError instead of a SIGBUS from a stale mapping."""

    def __init__(self, headers: dict[str, tuple[Path, str, tuple[int, ...]]]):
        self.headers = headers

    def read(self, name: str, dtype: Any) -> Any:
        import torch
        from safetensors import SafetensorError, safe_open

        path, kind, shape = self.headers[name]
        out = torch.empty(shape, dtype=dtype)
        row_bytes = max(1, out[0].numel() * out.element_size()) if shape else 1
        rows = max(1, CHUNK_BYTES // row_bytes)
        try:
            for start in range(0, shape[0] if shape else 1, rows):
                with safe_open(str(path), framework="pt") as f:
                    piece = f.get_slice(name)
                    found = (piece.get_dtype(), tuple(piece.get_shape()))
                    if found != (kind, shape):
                        raise SourceError(f"{path}: {name} changed while it was read: {found[0]} {list(found[1])}, "
                                          f"checked as {kind} {list(shape)}")
                    out[start:start + rows] = piece[start:start + rows] if shape else piece[:]
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
        return out


def check_dtypes(headers: dict[str, tuple[Path, str, tuple[int, ...]]], names: list[str]) -> None:
    odd = [n for n in names if headers[n][1] not in FLOAT_DTYPES]
    if odd:
        raise SourceError(f"{headers[odd[0]][0]}: weights must be floating point; "
                          + ", ".join(f"{n} is {headers[n][1]}" for n in odd[:5]))


def read_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer.json (token ids still work)."""
    from edgellama.tokenizer import Tokenizer

    # lexists: a tokenizer.json symlinked outside must reach the tokenizer's refusal, not be stat'ed
    if not os.path.lexists(folder / "tokenizer.json"):
        return None
    return Tokenizer.from_folder(folder)


def read_hf_folder(folder: Path) -> tuple[LlamaConfig, dict[str, tuple[int, ...]], SafetensorsWeights, Any,
                                          list[Path]]:
    """(config, {name: shape} of the weights to read, their reader, Tokenizer or None, the files the
    weights came from): the one boundary for a checkpoint folder. The config, the index and the
    safetensors headers (names, shapes, dtypes) are checked against each other; no tensor is read."""
    config = read_config(folder)
    files = weight_files(folder)
    headers = read_headers(files)
    # transformers < 4.31 saved the rotary table as a buffer; it is derived from the config again
    headers = {k: v for k, v in headers.items() if not k.endswith("rotary_emb.inv_freq")}
    names = check_shapes(config, {k: shape for k, (_, _, shape) in headers.items()}, where=str(folder))
    check_dtypes(headers, names)
    return (config, {n: headers[n][2] for n in names}, SafetensorsWeights(headers), read_tokenizer(folder),
            files)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
