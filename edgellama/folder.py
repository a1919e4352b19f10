"""The model folder: written atomically, described by a typed manifest, checked before it is trusted.

A folder holds `model.onnx` with its weights in `model.onnx.data` (always external: one rule for
every size, and the 2 GB protobuf limit never matters), the tokenizer files, `edgellama.json`
(the manifest, read into `Manifest`) and `genai_config.json` (so onnxruntime-genai loads the
folder as is).

Writers stage everything in a hidden temp folder beside OUT and rename it into place last, so an
interrupted export or quantization never leaves a folder that looks complete, and an existing
OUT is only replaced (with `force`) once the new one is whole.

This is the one home of: the folder's file names, the manifest (typed), staged writing,
verification, the sha256 of a file, and the external-data containment check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
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
TARGETS = ("portable", "ort", "onnx23")


# -- the manifest ---------------------------------------------------------------------------------

def pass_precision(*passes: str) -> str | None:
    """The precision quantization passes (or modes: `int4-fast`, a bench's precision name) leave a
    folder at, the lowest of them: int4, int8-dynamic, int8 or fp16; None for none of those. What
    parity's tolerances, the benchmarks' genai counterpart and a folder's `precision` go by."""
    modes = [str(m or "").lower() for m in passes]
    if any("int4" in m or "4bit" in m for m in modes):
        return "int4"
    if any("int8-dynamic" in m or "w8a8" in m for m in modes):
        return "int8-dynamic"
    if any("int8" in m for m in modes):
        return "int8"
    if any("fp16" in m or "float16" in m for m in modes):
        return "fp16"
    return None


@dataclasses.dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    """edgellama.json, typed. `config` stays the plain dict that `LlamaConfig.from_dict` reads
    (the base package does not know the model's config class)."""

    config: dict[str, Any]
    target: str = "portable"
    dtype: str = "fp32"
    provider: str = "cpu"
    opset: int = 23
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantization: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    io: dict[str, Any] = dataclasses.field(default_factory=dict)
    packages: dict[str, str] = dataclasses.field(default_factory=dict)
    quantized_from: dict[str, Any] | None = None
    # The graph contract of the KV cache: "dynamic" (past in, present = past ++ new out; folders
    # written before this field) or "static" (one buffer per layer bound as past and present).
    kv_cache: str = "dynamic"
    files: dict[str, FileRecord] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- facts about the folder, each read here only ---------------------------------------------
    @property
    def quant_pass(self) -> str | None:
        """The quantization pass applied ('int8', 'int4', ...), or None for a plain export.
        quant/ records it under "pass"; "mode" is accepted from hand-written manifests."""
        for q in self.quantization:
            name = (q.get("pass") or q.get("mode")) if isinstance(q, dict) else q
            if name:
                return str(name).lower()
        return None

    @property
    def precision(self) -> str:
        """The precision the folder runs at: fp32 / fp16, or the quantization applied (int8,
        int8-dynamic, int4; int4-fast is int4). The lowest wins: an fp32 export quantized to int4 is int4."""
        modes = [str((q.get("pass") or q.get("mode") or "") if isinstance(q, dict) else q)
                 for q in self.quantization]
        return pass_precision(*modes) or ("fp16" if str(self.dtype or "fp32").lower() in ("fp16", "float16") else "fp32")

    @property
    def source_spec(self) -> str:
        """What export's `load_model` needs to load the folder's source again (a path, `smollm2`, `tiny`)."""
        src = self.source
        if src.get("spec"):
            return str(src["spec"])
        if src.get("path") and src.get("kind") not in ("tiny", "smollm2"):
            return str(src["path"])
        if src.get("name"):
            return str(src["name"])
        raise ModelFolderError("the folder's manifest records no source; pass --reference OTHER_MODEL instead")

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type as the graph declares it ('float' or 'float16')."""
        for v in self.io.get("inputs", []):
            if isinstance(v, dict) and str(v.get("name", "")).startswith("past_key_values."):
                return "float16" if str(v.get("dtype")) in ("float16", "fp16") else "float"
        return "float16" if self.dtype == "fp16" else "float"

    @property
    def weight_bytes(self) -> int:
        """Bytes of model.onnx.data (what a decode step reads from memory, to first order)."""
        rec = self.files.get(DATA)
        return rec.bytes if rec else 0

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"format_version": self.format_version}
        for f in dataclasses.fields(self):
            if f.name in ("format_version", "files"):
                continue
            value = getattr(self, f.name)
            if f.name == "quantized_from" and value is None:
                continue
            out[f.name] = value
        out["files"] = {name: dataclasses.asdict(rec) for name, rec in self.files.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str = MANIFEST) -> "Manifest":
        """Validate a parsed edgellama.json; ModelFolderError naming the first bad field."""
        if not isinstance(data, dict):
            raise ModelFolderError(f"{where} is corrupted: not a JSON object")
        if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
            raise ModelFolderError(f"{where} has an unknown format (format_version {data.get('format_version')!r})")
        kinds = {"config": dict, "target": str, "dtype": str, "provider": str, "opset": int, "source": dict,
                 "quantization": list, "io": dict, "packages": dict, "quantized_from": (dict, type(None)),
                 "kv_cache": str, "files": dict}
        for key, kind in kinds.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise ModelFolderError(f"{where} is corrupted: '{key}' has the wrong type "
                                       f"({type(data[key]).__name__})")
        if "config" not in data:
            raise ModelFolderError(f"{where} is corrupted: it has no 'config'")
        if not 0 < data.get("opset", 23) < 1000:
            raise ModelFolderError(f"{where} is corrupted: 'opset' {data['opset']} is not an opset")
        _check_entries(data, where=where)
        files = {}
        for name, rec in data.get("files", {}).items():
            if name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
                raise ModelFolderError(f"{where} is corrupted: the entry {name[:60]!r} is not a file of the folder")
            if (not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or isinstance(rec.get("bytes"), bool)
                    or not 0 <= rec["bytes"] < 1 << 62 or not isinstance(rec.get("sha256"), str)):
                raise ModelFolderError(f"{where} is corrupted: the record of {name[:60]!r} is not {{bytes, sha256}}")
            files[name] = FileRecord(bytes=rec["bytes"], sha256=rec["sha256"])
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known and k != "files"}
        return cls(**fields, files=files)


def _check_entries(data: dict[str, Any], *, where: str) -> None:
    """The shapes inside the manifest's containers that the properties above read."""
    def refuse(key: str) -> None:
        raise ModelFolderError(f"{where} is corrupted: '{key}' has the wrong type")

    for q in data.get("quantization", []):
        if not isinstance(q, (dict, str)) or (isinstance(q, dict) and not all(
                isinstance(q.get(k), (str, type(None))) for k in ("pass", "mode"))):
            refuse("quantization")
    for key in ("inputs", "outputs"):
        entries = data.get("io", {}).get(key, [])
        if not isinstance(entries, list) or not all(isinstance(v, dict) for v in entries):
            refuse(f"io.{key}")
    if not all(isinstance(v, str) for v in data.get("packages", {}).values()):
        refuse("packages")
    if not all(isinstance(data.get("source", {}).get(k), (str, type(None))) for k in ("spec", "path", "name", "kind")):
        refuse("source")


# -- paths taken from untrusted files ----------------------------------------------------------------
def inside(folder: Path, name: str, *, what: str = "file", hub_cache: bool = False) -> Path:
    """`folder / name`, refused (ModelFolderError) unless it resolves, symlinks included, to a path
    inside `folder`: every path read from an index, a manifest, external data or tokenizer files
    goes through here before anything is opened or stat'ed.

    With `hub_cache`, a source checkpoint laid out as the Hugging Face hub cache lays it out
    (`<repo>/snapshots/<rev>/<file>` symlinked to `<repo>/blobs/<hash>`) may also resolve into its
    own repo's blobs folder, and only there, through a plain file name."""
    root = Path(folder).resolve()
    if not isinstance(name, str) or not name or "\x00" in name or Path(name).is_absolute():
        raise ModelFolderError(f"{folder}: the {what} {name!r} is not a path inside the folder")
    target = (root / name).resolve()
    if target != root and root in target.parents:
        return target
    if hub_cache and root.parent.name == "snapshots" and ".." not in Path(name).parts:
        if (root.parent.parent / "blobs").resolve() in target.parents:
            return target
    raise ModelFolderError(f"{folder}: the {what} {name!r} points outside the folder")


def json_safe(x: Any) -> Any:
    """`x` with every non-finite float written as "inf", "-inf" or "nan": JSON cannot hold them."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def read_json(path: Path, *, error: type[Exception] = ModelFolderError, bad: str = "corrupted") -> Any:
    """A JSON file of an untrusted folder, parsed: any failure (unreadable, bad UTF-8 or JSON,
    nesting too deep, a 5000-digit number) is one `error` line "{path}: {bad} ({reason})"."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise error(f"{path}: {bad} ({reason})") from None


# -- writing ------------------------------------------------------------------------------------
def _related(a: Path, b: Path) -> bool:
    """Whether two resolved paths are the same or one contains the other."""
    return a == b or a in b.parents or b in a.parents


def check_output(out: Path, *, force: bool, inputs: tuple[Path | str, ...] = ()) -> None:
    """Refuse OUT before any work is done: an output equal to, inside or containing an input; a
    path whose parent is a file; an existing non-empty folder unless `force`, and with `force`
    anything but a folder edgellama wrote (it has our manifest): --force replaces only our own."""
    out = Path(out)
    real = out.resolve()
    for src in inputs:
        src_real = Path(src).resolve()
        if _related(real, src_real):
            raise ModelFolderError(f"output {out} overlaps the input {src}; write the output elsewhere")
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ModelFolderError(f"output {out}: {parent} is a file, not a folder")
            break
    if out.exists() and not out.is_dir():
        raise ModelFolderError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ModelFolderError(f"output folder {out} is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise ModelFolderError(f"output folder {out} is not empty and is not an edgellama model folder; "
                                   "--force replaces only folders edgellama wrote")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held (delivered on exit) for a few system calls that must not be split."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def staged_folder(out: Path, *, force: bool, inputs: tuple[Path | str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out` in one rename.

    Whatever goes wrong inside (a full disk, an interrupt), the temp folder is removed and an older
    `out` is left as it was; an OSError becomes one ModelFolderError line."""
    out = Path(out).absolute()
    check_output(out, force=force, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ModelFolderError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    try:
        try:
            yield tmp
        except OSError as e:
            raise ModelFolderError(f"writing {out} failed: {e.strerror or e}"
                                   f"{' (' + e.filename + ')' if getattr(e, 'filename', None) else ''}") from None
        # Private while it is written, readable as any folder `mkdir` makes once it is the output.
        tmp.chmod(0o777 & ~_umask())
        old = None
        # An interrupt between the two renames would leave OUT missing: hold signals across the swap.
        with _signals_held():
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                if old is not None:
                    old.rename(out)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model(model: Any, folder: Path) -> FileRecord:
    """Save an onnx_ir Model (or an onnx ModelProto) as model.onnx + model.onnx.data; returns the
    data file's record, hashed as it is written.

    Initializers are written one at a time, in graph order and packed densely (onnx_ir's `save`
    layout), each LazyTensor evaluated just before its bytes go out and dropped after: a model
    whose weights are lazy (a streamed export, a quantization) never holds them all."""
    import onnx
    import onnx_ir as ir

    folder = Path(folder)
    for stale in (folder / MODEL, folder / DATA):
        stale.unlink(missing_ok=True)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    values = [v for graph in model.graphs() for v in graph.initializers.values()
              if v.const_value is not None and v.const_value.nbytes > 0]
    tensors = [v.const_value for v in values]
    try:
        with open(folder / DATA, "wb") as f:
            out = HashingWriter(f)
            for value, tensor in zip(values, tensors):
                offset = out.bytes
                _write_tensor(tensor, out)
                value.const_value = ir.ExternalTensor(DATA, offset, out.bytes - offset, tensor.dtype,
                                                      shape=tensor.shape, name=tensor.name, base_dir=str(folder))
        ir.save(model, folder / MODEL)   # the external references above are kept as they are
    finally:
        for value, tensor in zip(values, tensors):
            value.const_value = tensor
    return out.record()


def _write_tensor(tensor: Any, out: "HashingWriter") -> None:
    import numpy as np
    import onnx_ir as ir

    if tensor.dtype.bitwidth % 8 == 0 and not isinstance(tensor, ir.ExternalTensor):
        # One buffer, no copy: `tobytes()` would hold the tensor twice.
        array = np.ascontiguousarray(tensor.numpy())
        out.write(array.reshape(-1).view(np.uint8))
    else:
        tensor.tofile(out)   # an external tensor is copied in chunks; packed types write their bytes


def _sha256() -> Any:
    return hashlib.sha256()


class HashingWriter:
    """A binary file being written, its size and sha256 taken as the bytes go by (the incremental
    form of `sha256_file`)."""

    def __init__(self, file: Any):
        self.file, self.bytes, self._digest = file, 0, _sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self._digest.update(view)
        self.bytes += view.nbytes
        return view.nbytes

    def record(self) -> FileRecord:
        return FileRecord(bytes=self.bytes, sha256=self._digest.hexdigest())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The one sha256 of a file in edgellama."""
    h = _sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, manifest: Manifest, *, known: dict[str, FileRecord] | None = None) -> Manifest:
    """Write edgellama.json with the size and sha256 of every other file in the folder; `known`
    records (taken while a file was written) are used for files of that size instead of reading
    them again."""
    folder = Path(folder)
    known = known or {}

    def record(p: Path) -> FileRecord:
        size = p.stat().st_size
        rec = known.get(p.name)
        return rec if rec is not None and rec.bytes == size else FileRecord(bytes=size, sha256=sha256_file(p))

    files = {p.name: record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = dataclasses.replace(manifest, files=files, format_version=FORMAT_VERSION)
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, default=str) + "\n")
    return manifest


def copy_side_files(src: Path, dst: Path, manifest: Manifest) -> None:
    """Copy every file the manifest lists except the model, its weights and the manifest itself
    (tokenizer files, genai_config.json): what a folder-to-folder pass carries over unchanged."""
    for name in manifest.files:
        if name not in (MODEL, DATA, MANIFEST):
            shutil.copy2(Path(src) / name, Path(dst) / name)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("edgellama", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime-gpu", "onnxruntime",
                 "transformers", "gguf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def genai_config(config: Any, *, inputs: list[str], provider: str = "cpu", share_buffer: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this decoder: past and present separate, or (static
    KV cache, `share_buffer`) one buffer bound as both, and no position_ids when the graph has none."""
    eos = config.eos_token_ids
    options = [] if provider == "cpu" else [{provider: {}}]
    return {
        "model": {
            # genai's parser wants a number here: a config without a BOS token (Qwen2) omits the key.
            **({"bos_token_id": config.bos_token_id} if config.bos_token_id is not None else {}),
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": options},
                "filename": MODEL,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if "position_ids" in inputs else {}),
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
            "type": getattr(config, "model_type", "llama"),   # genai's decoder-only types: llama, mistral, qwen2, qwen3
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: Any, *, inputs: list[str], share_buffer: bool = False) -> None:
    text = json.dumps(genai_config(config, inputs=inputs, share_buffer=share_buffer), indent=2)
    (Path(folder) / GENAI_CONFIG).write_text(text + "\n")


# -- reading ------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> Manifest:
    """The manifest of an edgellama folder, or ModelFolderError saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a model folder (no such directory)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an edgellama model folder (no {MANIFEST})")
    return Manifest.from_dict(read_json(path, bad="the manifest is corrupted"), where=str(path))


def verify_folder(folder: Path, *, hash_limit_bytes: int = 1 << 30) -> Manifest:
    """Check the files the manifest lists: present, of the recorded size, and (below `hash_limit_bytes`)
    of the recorded sha256. Returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, rec in manifest.files.items():
        path = inside(folder, name, what="manifest entry")
        if not path.is_file():
            raise ModelFolderError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != rec.bytes:
            raise ModelFolderError(f"{folder}: {name} is corrupted ({size} bytes, manifest says {rec.bytes})")
        if rec.bytes <= hash_limit_bytes and sha256_file(path) != rec.sha256:
            raise ModelFolderError(f"{folder}: {name} is corrupted (sha256 differs from the manifest)")
    return manifest


def _external_tensors(model: Any) -> list[Any]:
    """Every TensorProto with external data in a ModelProto or a model outline (graph, subgraphs
    and functions)."""
    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node):
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
            all_tensors.extend(node_tensors(node))
    return [t for t in all_tensors if t.data_location == _EXTERNAL]


def external_data_paths(model: Any) -> list[str]:
    """Every external-data location named in a ModelProto (graph, subgraphs and functions)."""
    return [e.value for t in _external_tensors(model) for e in t.external_data if e.key == "location"]


def check_external_data(model: Any, folder: Path) -> None:
    """The one check of a model's external-data records (model.onnx is untrusted input): each location
    inside `folder` and present, each offset and length a non-negative integer, and the bytes the
    tensor needs within its file, so no reader (ONNX Runtime, onnx_ir in quantize) runs past the end."""
    sizes: dict[str, int] = {}
    for tensor in _external_tensors(model):
        record = {e.key: e.value for e in tensor.external_data}
        loc = record.get("location", "")
        if loc not in sizes:
            try:
                path = inside(folder, loc, what="external data location")
            except ModelFolderError:
                raise ModelFolderError(f"{folder}: external data location {loc[:80]!r} points outside the "
                                       "model folder") from None
            if not path.is_file():
                raise ModelFolderError(f"{folder}: external data file {loc[:80]} is missing")
            sizes[loc] = path.stat().st_size
        offset, length = record.get("offset", "0"), record.get("length")
        needed = _tensor_bytes(tensor)
        if not offset.isdigit() or (length is not None and not length.isdigit()):
            raise ModelFolderError(f"{folder}: the external data record of {tensor.name[:80]!r} is corrupted "
                                   f"(offset {offset[:20]!r}, length {str(length)[:20]!r})")
        span = max(int(length) if length is not None else 0, needed if needed is not None else 0)
        if int(offset) + span > sizes[loc] or (length is not None and needed is not None and int(length) < needed):
            raise ModelFolderError(f"{folder}: the external data of {tensor.name[:80]!r} runs past the end of "
                                   f"{loc[:80]} (offset {offset}, length {length}, file {sizes[loc]} bytes)")


# TensorProto.DataType -> bits per element (onnx_ir.DataType.bitwidth, without importing onnx_ir
# and the sympy it loads: tests/runtime/test_rss_outline.py checks the two agree). STRING and
# UNDEFINED have no fixed width.
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
         16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2, 27: 6, 28: 6}
_EXTERNAL = 1   # TensorProto.DataLocation.EXTERNAL


def _tensor_bytes(tensor: Any) -> int | None:
    """Bytes a tensor's data takes, from its dims and element type (None when the type has no fixed width)."""
    if any(d < 0 for d in tensor.dims):
        return 1 << 62  # never fits: a negative dimension is a corrupted record
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return None
    numel = 1
    for d in tensor.dims:
        numel *= d
    return (numel * bits + 7) // 8


def check_vocab(model: Any, *, vocab_size: int, folder: Path) -> None:
    """Refuse a folder whose manifest's vocab_size disagrees with the graph (the rows of the embedding
    table that input_ids index, the logits' width): the runtime bounds token ids by the manifest, and
    ids past the real table would reach ONNX Runtime's Gather. `model`: a ModelProto or an outline."""
    sizes = {}
    rows = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    for node in model.graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in node.input[1:2]:
            if node.input[0] in rows:
                sizes["the embedding table"] = rows[node.input[0]]
    for output in model.graph.output:
        if output.name == "logits":
            dims = output.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                sizes["the logits"] = dims[-1].dim_value
    for what, n in sizes.items():
        if n != vocab_size:
            raise ModelFolderError(f"{folder}: the manifest's vocab_size ({vocab_size}) disagrees with the "
                                   f"model ({what} has {n} entries)")


def load_model_proto(folder: Path, *, with_weights: bool = True) -> Any:
    """Load model.onnx after checking that its external data stays inside the folder."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = _model_path(folder)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage
        raise ModelFolderError(f"{path} is corrupted: {e}") from None
    check_external_data(model, Path(folder))
    if with_weights:
        load_external_data_for_model(model, str(folder))
    return model


def load_model_outline(folder: Path) -> Any:
    """model.onnx's outline, its external data checked to stay inside the folder: what the checks
    here read (initializer records, nodes, attributes, functions, graph outputs), parsed with
    protobuf alone under onnx.proto's own field numbers, so `.graph.initializer`, `.functions`,
    `HasField` and the rest read as on a ModelProto and the same fields parse to the same values.
    The runtime checks every folder it opens with this, not `load_model_proto`: importing onnx
    and onnx_ir (which loads sympy) would add ~50 MB to every process's resident memory."""
    path = _model_path(folder)
    try:
        outline = _outline_class().FromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage
        raise ModelFolderError(f"{path} is corrupted: {e}") from None
    check_external_data(outline, Path(folder))
    return outline


def _model_path(folder: Path) -> Path:
    path = Path(folder) / MODEL
    if not path.is_file():
        raise ModelFolderError(f"{folder}: {MODEL} is missing")
    return path


# The outline's messages: onnx.proto's (proto2, so that strings, enums, oneofs and merges of repeated
# messages parse as onnx's own classes parse them) less the fields no check reads; protobuf skips
# those as unknown fields. A message field kept only for its oneof is declared `bytes`: same wire
# type, never parsed.
_OUTLINE_MESSAGES: dict[str, list[tuple]] = {
    # message: [(field, number, label, type or message, oneof)]
    "StringStringEntryProto": [("key", 1, "o", "string"), ("value", 2, "o", "string")],
    "TensorProto": [("dims", 1, "r", "int64"), ("data_type", 2, "o", "int32"), ("name", 8, "o", "string"),
                    ("external_data", 13, "r", "StringStringEntryProto"),
                    ("data_location", 14, "o", "DataLocation")],
    "Dimension": [("dim_value", 1, "o", "int64", 0), ("dim_param", 2, "o", "string", 0)],
    "TensorShapeProto": [("dim", 1, "r", "Dimension")],
    "TensorType": [("elem_type", 1, "o", "int32"), ("shape", 2, "o", "TensorShapeProto")],
    "TypeProto": [("tensor_type", 1, "o", "TensorType", 0), ("sequence_type", 4, "o", "bytes", 0),
                  ("map_type", 5, "o", "bytes", 0), ("opaque_type", 7, "o", "bytes", 0),
                  ("sparse_tensor_type", 8, "o", "bytes", 0), ("optional_type", 9, "o", "bytes", 0)],
    "ValueInfoProto": [("name", 1, "o", "string"), ("type", 2, "o", "TypeProto")],
    "AttributeProto": [("name", 1, "o", "string"), ("t", 5, "o", "TensorProto"), ("g", 6, "o", "GraphProto"),
                       ("tensors", 10, "r", "TensorProto"), ("graphs", 11, "r", "GraphProto")],
    "NodeProto": [("input", 1, "r", "string"), ("output", 2, "r", "string"), ("name", 3, "o", "string"),
                  ("op_type", 4, "o", "string"), ("attribute", 5, "r", "AttributeProto"),
                  ("domain", 7, "o", "string")],
    "GraphProto": [("node", 1, "r", "NodeProto"), ("name", 2, "o", "string"), ("initializer", 5, "r", "TensorProto"),
                   ("output", 12, "r", "ValueInfoProto")],
    "FunctionProto": [("name", 1, "o", "string"), ("node", 7, "r", "NodeProto")],
    "ModelProto": [("graph", 7, "o", "GraphProto"), ("functions", 25, "r", "FunctionProto")],
}


@functools.lru_cache(maxsize=None)
def _outline_class() -> Any:
    """The outline's ModelProto class, built once, in a descriptor pool of its own (onnx's
    classes, if a process imports them, are not touched)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    scalars = {"string": F.TYPE_STRING, "bytes": F.TYPE_BYTES, "int32": F.TYPE_INT32, "int64": F.TYPE_INT64}
    package = "edgellama.outline"
    file = descriptor_pb2.FileDescriptorProto(name="edgellama_outline.proto", package=package, syntax="proto2")
    location = file.enum_type.add(name="DataLocation")
    location.value.add(name="DEFAULT", number=0)
    location.value.add(name="EXTERNAL", number=_EXTERNAL)
    for name, fields in _OUTLINE_MESSAGES.items():
        message = file.message_type.add(name=name)
        if any(len(f) > 4 for f in fields):
            message.oneof_decl.add(name="value")
        for field, number, label, kind, *oneof in fields:
            f = message.field.add(name=field, number=number,
                                  label=F.LABEL_REPEATED if label == "r" else F.LABEL_OPTIONAL)
            if kind in scalars:
                f.type = scalars[kind]
            elif kind == "DataLocation":
                f.type, f.type_name = F.TYPE_ENUM, f".{package}.DataLocation"
            else:
                f.type, f.type_name = F.TYPE_MESSAGE, f".{package}.{kind}"
            if oneof:
                f.oneof_index = oneof[0]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelProto"))


def load_model_ir(folder: Path) -> Any:
    """model.onnx as an onnx_ir Model, weights left lazy in model.onnx.data (checked to stay inside)."""
    import onnx_ir as ir

    proto = load_model_proto(folder, with_weights=False)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, Path(folder))
    return model
