"""A llama-, qwen2- or qwen3-architecture GGUF file as a LlamaConfig, HF-named fp32 weights and a Tokenizer.

Reference: transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`, `integrations/gguf/`), which
reads the same file into `LlamaForCausalLM` (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`, and
`MistralForCausalLM` for a llama-tagged file whose general.name says mistral): every tensor
dequantized to fp32, llama.cpp's Q/K row permutation undone (llama only: convert_hf_to_gguf permutes
no Qwen weights, their rotary is NEOX-style), the tokenizer rebuilt from `tokenizer.ggml.*` metadata.
Metadata keys are prefixed by the architecture (`qwen2.block_count`). llama.cpp's converter writes
no sliding window for Mistral; `llama.attention.sliding_window`, where a file has one, is read.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgellama.errors import ConfigError, SourceError
from edgellama.export.config import LlamaConfig, check_shapes

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# Tensors a llama GGUF may carry that are not weights of the model: rope_freqs holds llama3 factors
# (read into the config), rope_factors_* are per-length tables llama.cpp derives again itself.
_NOT_WEIGHTS = re.compile(r"^(rope_freqs|rope_factors_\w+)\.weight$")

# tokenizer.ggml.pre names whose merges were learned on Llama 3's split (llama.cpp's llama-vocab.cpp);
# every other byte-level vocabulary (gpt2, smollm, ...) gets GPT-2's split, as transformers gives it.
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split (Qwen2/2.5/3 and the distills built on them): Llama 3's with single digits, after NFC.
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _open(path: Path) -> tuple[Any, dict[str, Any]]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors on garbage
        raise SourceError(f"{path}: not a readable GGUF file ({_first_line(e)})") from None
    # the big tokenizer arrays are read only by _tokenizer, which needs them
    meta = {name: _value(field) for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_id")
            or name in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token")}
    kinds = {"tokenizer.chat_template": str, "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.model": str,
             "tokenizer.ggml.pre": str}
    for key, kind in kinds.items():
        if key in meta and not isinstance(meta[key], kind):
            raise SourceError(f"{path}: malformed metadata: {key} is not a {kind.__name__}")
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture is {str(arch)[:40]!r}; "
                          "edgellama loads the llama architecture (Mistral included), qwen2 and qwen3")
    return reader, meta


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, tuple[int, ...]], "GgufWeights", Any]:
    """(config, {HF name: shape}, their reader, Tokenizer or None) of a llama GGUF file: the one
    boundary for GGUF. Metadata is type-checked into the config and the tensor shapes checked against
    it; no tensor is dequantized until read. Whatever the gguf reader raises on a damaged file is one
    SourceError."""
    with _damaged_file(path):
        reader, meta = _open(path)
        tensors = {t.name: t for t in reader.tensors}
        try:
            config = _config(meta, tensors, reader)
        except ConfigError as e:
            raise SourceError(f"{path}: {e}") from None
        weights = GgufWeights(tensors, config, path)
        return config, weights.shapes, weights, _tokenizer(reader, meta, path)


def read_gguf_tokenizer(path: Path) -> Any:
    """Only the tokenizer of a llama GGUF file (None for a vocabulary other than byte-level BPE)."""
    with _damaged_file(path):
        reader, meta = _open(path)
        return _tokenizer(reader, meta, path)


@contextlib.contextmanager
def _damaged_file(path: Path) -> Iterator[None]:
    """The gguf reader indexes the file's own offsets and counts: a damaged file surfaces as one of
    these (never as our bug, which the type checks above keep out)."""
    try:
        yield
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, MemoryError) as e:
        raise SourceError(f"{path}: not a readable GGUF file ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


# -- metadata -------------------------------------------------------------------------------------
def _value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - an exotic field type we never read
        return None


def _f32(value: float) -> float:
    """GGUF stores floats as fp32; the shortest decimal that round-trips gives back the config's 1e-05."""
    return float(str(np.float32(value)))


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = meta.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"metadata {key} must be an integer, got {type(value).__name__}")
    return value


def _float(meta: dict[str, Any], key: str, default: float | None = None) -> float | None:
    value = meta.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"metadata {key} must be a positive number, got {str(value)[:40]}")
    return _f32(value)


def _config(meta: dict[str, Any], tensors: dict[str, Any], reader: Any) -> LlamaConfig:
    """transformers' `GGUF_CONFIG_MAPPING[arch]`, plus llama3 rope scaling recovered from rope_freqs;
    every field type-checked here, its bounds in `LlamaConfig.validate`."""
    arch = meta["general.architecture"]
    meta = {(("llama." + k[len(arch) + 1:]) if k.startswith(arch + ".") else k): v for k, v in meta.items()}
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(meta.get(f"llama.{key}"), list):
            raise ConfigError("per-layer head counts or feed-forward sizes are not a llama shape edgellama exports")
    hidden, heads = _int(meta, "llama.embedding_length"), _int(meta, "llama.attention.head_count")
    if not hidden or not heads:
        raise ConfigError("metadata lacks llama.embedding_length / llama.attention.head_count")
    vocab = _int(meta, "llama.vocab_size")
    if not vocab and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    head_dim = (_int(meta, "llama.attention.key_length") or _int(meta, "llama.rope.dimension_count")
                or hidden // heads)
    theta = _float(meta, "llama.rope.freq_base", 10000.0)
    scaling = None
    kind = meta.get("llama.rope.scaling.type")
    if kind == "linear":
        if meta.get("llama.rope.scaling.factor") is None:
            raise ConfigError("linear rope scaling without llama.rope.scaling.factor")
        scaling = {"rope_type": "linear", "factor": _float(meta, "llama.rope.scaling.factor")}
    elif kind == "yarn":
        # what convert_hf_to_gguf writes for a yarn config (Qwen2.5/Qwen3 long context)
        factor, ctx = _float(meta, "llama.rope.scaling.factor"), _int(meta, "llama.rope.scaling.original_context_length")
        if factor is None or ctx is None:
            raise ConfigError("yarn rope scaling without llama.rope.scaling.factor / original_context_length")
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ctx}
    elif kind not in (None, "none"):
        raise ConfigError(f"unsupported rope scaling {str(kind)[:40]!r}; supported: linear, yarn, llama3")
    if "rope_freqs.weight" in tensors:
        if not 0 < head_dim <= 1 << 12:
            raise ConfigError(f"head dimension {head_dim} is not a llama shape")
        scaling = _llama3_scaling(_array(tensors["rope_freqs.weight"]), theta=theta, head_dim=head_dim)
    # llama.cpp stops on every end-of-generation token (eos, end-of-turn, end-of-message); transformers'
    # configs list them all as eos_token_id (Llama 3.1: 128001, 128008, 128009)
    stops = [_int(meta, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    eos = stops[0] if len(stops) == 1 else (stops or None)
    name = meta.get("general.name")
    family = "mistral" if arch == "llama" and isinstance(name, str) and "mistral" in name.lower() else arch
    return LlamaConfig(
        model_type=family, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        sliding_window=_int(meta, "llama.attention.sliding_window") if family == "mistral" else None,
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_int(meta, "llama.feed_forward_length", 0),
        num_hidden_layers=_int(meta, "llama.block_count", 0), num_attention_heads=heads,
        num_key_value_heads=_int(meta, "llama.attention.head_count_kv") or heads, head_dim=head_dim,
        max_position_embeddings=_int(meta, "llama.context_length", 2048),
        rms_norm_eps=_float(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5), rope_theta=theta,
        rope_scaling=scaling, tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_int(meta, "tokenizer.ggml.bos_token_id"), eos_token_id=eos,
        pad_token_id=_int(meta, "tokenizer.ggml.padding_token_id"))


def _llama3_scaling(factors: np.ndarray, *, theta: float, head_dim: int) -> dict[str, Any] | None:
    """llama3 rope parameters that reproduce the file's rope_freqs (the divisor of each frequency).

    convert_hf_to_gguf writes the factors, not the parameters. Meta's releases use low 1, high 4 and an
    original context of 8192; the factor is the largest divisor. Refuse a table these do not reproduce.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    params = {"rope_type": "llama3", "factor": _f32(float(factors.max())), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = params["original_max_position_embeddings"] / np.array([1.0, 4.0])
    smooth = (params["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
    want = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, params["factor"],
                                                     1.0 / ((1 - smooth) / params["factor"] + smooth)))
    if want.shape != factors.shape or not np.allclose(want, factors, rtol=1e-3):
        raise ConfigError("rope_freqs does not match llama3 scaling with Meta's parameters; "
                          "convert the model from its Hugging Face folder instead")
    return params


# -- weights --------------------------------------------------------------------------------------
def _array(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    # F32 tensors come back as read-only views of the memory-mapped file; torch wants its own copy
    return np.require(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, requirements=["C", "W"])


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute` of q_proj/k_proj rows.

    llama.cpp rotates adjacent pairs (GPT-J layout), so the converter interleaves each head's two
    halves: GGUF row (h, j, i) holds HF row (h, i, j) for i in {0, 1}, j < head_dim/2.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weight_name(gguf_name: str) -> str | None:
    """The transformers name of a llama GGUF tensor (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`); None for a tensor that is no weight of the model."""
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return _TOP_NAMES.get(gguf_name)


class GgufWeights:
    """The weights under transformers' names, their shapes (from the header: ggml lists dimensions
    innermost first) checked against the config up front; each tensor dequantized (and llama's q/k
    rows unpermuted) only when read."""

    def __init__(self, tensors: dict[str, Any], config: LlamaConfig, path: Path):
        names: dict[str, str] = {}
        unknown = []
        for name in tensors:
            if _NOT_WEIGHTS.match(name):
                continue
            hf = hf_weight_name(name)
            if hf is None:
                unknown.append(name)
            else:
                names[hf] = name
        if unknown:
            raise SourceError(f"{path}: tensors a {config.model_type} model does not have: "
                              f"{', '.join(n[:80] for n in sorted(unknown)[:5])}")
        shapes = {hf: tuple(int(n) for n in reversed(tensors[name].shape)) for hf, name in names.items()}
        self.shapes = {hf: shapes[hf] for hf in check_shapes(config, shapes, where=str(path))}
        self.tensors, self.names, self.config, self.path = tensors, names, config, path

    def read(self, name: str, dtype: Any) -> Any:
        import torch

        with _damaged_file(self.path):
            w = _array(self.tensors[self.names[name]]).reshape(self.shapes[name])
        # the converter permutes llama's q/k rows only
        if self.config.model_type in ("llama", "mistral"):
            if name.endswith("q_proj.weight"):
                w = unpermute_rows(w, self.config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_rows(w, self.config.num_key_value_heads)
        return torch.from_numpy(np.ascontiguousarray(w)).to(dtype)


# -- tokenizer ------------------------------------------------------------------------------------
def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer(reader: Any, meta: dict[str, Any], path: Path) -> Any:
    """The tokenizer transformers builds from a GGUF's metadata: byte-level BPE ("gpt2") or
    sentencepiece BPE ("llama"); other vocabularies give None (token ids only)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama" and "tokenizer.ggml.tokens" in reader.fields:
        return _sentencepiece_tokenizer(reader, meta, path)
    if kind != "gpt2" or "tokenizer.ggml.merges" not in reader.fields:
        return None
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    tokens = _list(reader, "tokens", str, path=path)
    merges = [tuple(m.split(" ", 1)) for m in _list(reader, "merges", str, path=path)]
    types = _list(reader, "token_type", int, path=path)
    chars = byte_chars()
    alphabet = set(chars.values())

    def spelled(token: str) -> str:
        # some converters store a token as raw text; the BPE model looks tokens up byte-spelled
        return token if set(token) <= alphabet else "".join(chars[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    try:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad vocabulary
        raise SourceError(f"{path}: malformed tokenizer metadata ({_first_line(e)})") from None
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        if pre in _QWEN2_PRE:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre in _QWEN2_PRE else _LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # A "control" token spelled outside the byte alphabet is a converter mislabel transformers skips.
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    return _wrap_backend(backend, meta, tokens, types, control=control, add_bos=False)


def _list(reader: Any, key: str, kind: type | tuple[type, ...], *, path: Path) -> list[Any]:
    """A tokenizer.ggml.* array, its element type checked ([] when absent)."""
    field = reader.fields.get(f"tokenizer.ggml.{key}")
    values = field.contents() if field is not None else []
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise SourceError(f"{path}: malformed tokenizer metadata: tokenizer.ggml.{key} is not an array of "
                          f"{getattr(kind, '__name__', 'numbers')}s")
    return values


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a sentencepiece vocabulary implies: every split of a piece into two pieces, best
    piece score first (transformers' `generate_merges` order: score, then left and right lengths)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in index and piece[k:] in index]
        pairs.sort(key=lambda lr: (index[lr[0]], index[lr[1]]))
        found.extend((score, len(l), len(r), l, r) for l, r in pairs)
    # stable sort on the key alone, descending, keeps the per-piece order among equals
    found.sort(key=lambda f: (f[0], f[1], f[2]), reverse=True)
    return [(l, r) for _, _, _, l, r in found]


def _sentencepiece_tokenizer(reader: Any, meta: dict[str, Any], path: Path) -> Any:
    """transformers' `LlamaTokenizer` over a GGUF vocabulary: BPE with byte fallback, a "▁" prefix
    on the first word, control tokens special."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    fields = reader.fields
    tokens = _list(reader, "tokens", str, path=path)
    scores = _list(reader, "scores", (int, float), path=path) if "tokenizer.ggml.scores" in fields else None
    types = _list(reader, "token_type", int, path=path)
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ", 1)) for m in _list(reader, "merges", str, path=path)]
    elif scores is not None:
        merges = _merges_from_scores(tokens, scores)
    else:
        raise SourceError(f"{path}: sentencepiece vocabulary has neither merges nor scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad vocabulary
        raise SourceError(f"{path}: malformed tokenizer metadata ({_first_line(e)})") from None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    control = [t for t, k in zip(tokens, types) if k == _CONTROL]
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise (so does transformers)
    return _wrap_backend(backend, meta, tokens, types, control=control, add_bos=True)


def _wrap_backend(backend: Any, meta: dict[str, Any], tokens: list[str], types: list[int], *,
                  control: list[str], add_bos: bool) -> Any:
    """The Tokenizer over a GGUF vocabulary's backend: control tokens stay whole and are skipped on
    decode, user-defined ones stay whole but are text; BOS prepended when the file (or `add_bos`,
    the vocabulary kind's default) asks for it."""
    from tokenizers import AddedToken

    from edgellama.tokenizer import Tokenizer

    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if user:
        backend.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    _add_bos(backend, token("bos_token_id"), meta.get("tokenizer.ggml.add_bos_token", add_bos))
    return Tokenizer(backend, chat_template=meta.get("tokenizer.chat_template"), bos_token=token("bos_token_id"),
                     eos_token=token("eos_token_id"), pad_token=token("padding_token_id"),
                     unk_token=token("unknown_token_id"))


def _add_bos(backend: Any, bos: str | None, wanted: bool) -> None:
    """`encode(..., add_special_tokens=True)` prepends BOS when the file asks for it."""
    from tokenizers import processors

    if wanted and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
