"""The model folder: written atomically, described by a manifest, checked before it is trusted.

A folder holds `model.onnx` with its weights in `model.onnx.data` (always external: one rule for
every size, and the 2 GB protobuf limit never matters), the tokenizer files, `edgellama.json`
(the manifest) and `genai_config.json` (so onnxruntime-genai loads the folder as is).

Writers stage everything in a hidden temp folder beside OUT and rename it into place last, so an
interrupted export or quantization never leaves a folder that looks complete, and an existing
OUT is only replaced (with `force`) once the new one is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgellama.errors import ModelFolderError

MODEL = "model.onnx"
DATA = "model.onnx.data"
MANIFEST = "edgellama.json"
GENAI_CONFIG = "genai_config.json"
FORMAT_VERSION = 1


# -- writing ------------------------------------------------------------------------------------
def check_output(out: Path, *, force: bool) -> None:
    """Refuse an existing non-empty OUT unless `force`: called before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelFolderError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelFolderError(f"output folder {out} is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_folder(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out).absolute()
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: Any, folder: Path) -> None:
    """Save an onnx_ir Model or an onnx ModelProto as model.onnx + model.onnx.data."""
    import onnx
    import onnx_ir as ir

    folder = Path(folder)
    for stale in (folder / MODEL, folder / DATA):
        stale.unlink(missing_ok=True)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    ir.save(model, folder / MODEL, external_data=DATA, size_threshold_bytes=0)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write edgellama.json with the size and sha256 of every other file in the folder."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("edgellama", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime-gpu", "onnxruntime",
                 "transformers", "gguf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def genai_config(config: Any, *, io: dict[str, Any], provider: str = "cpu") -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this decoder (past and present kept separate)."""
    eos = config.eos_token_ids
    options = [] if provider == "cpu" else [{provider: {}}]
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": options},
                "filename": MODEL,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if "position_ids" in io["inputs"] else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0),
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: Any, *, io: dict[str, Any]) -> None:
    (Path(folder) / GENAI_CONFIG).write_text(json.dumps(genai_config(config, io=io), indent=2) + "\n")


# -- reading ------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an edgellama folder, or ModelFolderError saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a model folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an edgellama model folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has an unknown format (format_version {manifest.get('format_version')!r})"
                               if isinstance(manifest, dict) else f"{path} is corrupted: not a JSON object")
    return manifest


def verify_folder(folder: Path, *, hash_limit_bytes: int = 1 << 30) -> dict[str, Any]:
    """Check the files the manifest lists: present, of the recorded size, and (below `hash_limit_bytes`)
    of the recorded sha256. Returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, rec in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"{folder}: {name} is missing")
        if path.stat().st_size != rec.get("bytes"):
            raise ModelFolderError(f"{folder}: {name} is corrupted ({path.stat().st_size} bytes, "
                                   f"manifest says {rec.get('bytes')})")
        if rec.get("bytes", 0) <= hash_limit_bytes and sha256_file(path) != rec.get("sha256"):
            raise ModelFolderError(f"{folder}: {name} is corrupted (sha256 differs from the manifest)")
    return manifest


def external_data_paths(model: Any) -> list[str]:
    """Every external-data location named in a ModelProto (graph, subgraphs and functions)."""
    import onnx

    locations: list[str] = []

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            yield from _node_tensors(node)

    def _node_tensors(node):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from tensors(attr.g)
            for g in attr.graphs:
                yield from tensors(g)

    all_tensors = list(tensors(model.graph))
    for fn in model.functions:
        for node in fn.node:
            all_tensors.extend(_node_tensors(node))
    for t in all_tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.extend(e.value for e in t.external_data if e.key == "location")
    return locations


def check_external_data(model: Any, folder: Path) -> None:
    """Refuse external data that points outside `folder`: a model file is untrusted input."""
    root = Path(folder).resolve()
    for loc in set(external_data_paths(model)):
        target = (root / loc).resolve()
        if Path(loc).is_absolute() or (target != root and root not in target.parents):
            raise ModelFolderError(f"{folder}: external data location {loc!r} points outside the model folder")


def load_model_proto(folder: Path, *, with_weights: bool = True) -> Any:
    """Load model.onnx after checking that its external data stays inside the folder."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    folder = Path(folder)
    path = folder / MODEL
    if not path.is_file():
        raise ModelFolderError(f"{folder}: {MODEL} is missing")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises several types for garbage
        raise ModelFolderError(f"{path} is corrupted: {e}") from None
    check_external_data(model, folder)
    if with_weights:
        load_external_data_for_model(model, str(folder))
    return model
