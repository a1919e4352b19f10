"""Quantization quality: perplexity, next-token KL and top-1 agreement against fp32 torch.

    text = eval_tokens(tokenizer, tokens=4096)              # stdlib docstrings, read at run time
    wins = make_windows(text, window=512, bos_id=tok.bos_token_id)
    ref = evaluate(torch_logits_fn(model), wins, keep_logprobs=True)      # P: fp32 torch
    got = evaluate(ort_logits_fn(folder / "model.onnx", ...), wins, reference=ref.logprobs)

Every candidate is a `LogitsFn`: token ids [1, S] int64 -> logits [1, S, vocab] (any float dtype),
one teacher-forced prefill per window, so torch, our ONNX folders and onnxruntime-genai's builder
output are measured by the same code. Definitions (llama.cpp's `perplexity --kl-divergence`
reports the same three): perplexity exp(mean -log Q(next token)); KL(P || Q) of the next-token
distributions in nats, averaged over positions; top-1 agreement, the fraction of positions where
argmax P == argmax Q. All in float64.

De-gridding (`degrid_gguf`): smollm2's weights come from a Q4_1 GGUF (blocks of 32, scale d and
minimum m each; the tied embedding Q8_0), so every weight sits on that block's grid and a
quantizer that reproduces the grid looks lossless. Adding U(-d/2, d/2) per weight (d: the block's
step, read from the file) moves the weights off the grid without changing their scale.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellama import contract
from edgellama.check.metrics import kl_of_logprobs, log_softmax
from edgellama.errors import RuntimeInputError
from edgellama.progress import SILENT, Progress

LogitsFn = Callable[[np.ndarray], np.ndarray]

# Standard-library modules whose docstrings are mostly English prose (not regex tables or code),
# in a fixed order. Their module docstrings come first (~9k smollm2 tokens); the docstrings of
# their public members follow, a reserve for longer runs.
TEXT_MODULES = ("argparse", "collections", "copy", "csv", "difflib", "doctest", "hashlib", "heapq",
                "inspect", "itertools", "json", "logging", "operator", "pickle", "pprint", "pydoc",
                "random", "sched", "statistics", "string", "subprocess", "tempfile", "typing", "unittest")

FRANCE_PROMPT = "What is the capital of France?"


# -- the text ---------------------------------------------------------------------------------------
def stdlib_text(modules: Sequence[str] = TEXT_MODULES) -> str:
    """The docstrings (`inspect.getdoc`) of `modules`, then of their public functions and classes
    defined there (sorted by name), joined by blank lines. Depends only on the installed Python."""
    loaded = [importlib.import_module(m) for m in modules]
    parts = [inspect.getdoc(m) or "" for m in loaded]
    with warnings.catch_warnings():  # typing.io / typing.re warn when touched; their text is fixed anyway
        warnings.simplefilter("ignore", DeprecationWarning)
        for m in loaded:
            for name in sorted(vars(m)):
                obj = getattr(m, name)
                if name.startswith("_") or getattr(obj, "__module__", None) != m.__name__:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def eval_tokens(tokenizer: Any, *, tokens: int = 4096, modules: Sequence[str] = TEXT_MODULES) -> list[int]:
    """The first `tokens` token ids of `stdlib_text(modules)` (no special tokens)."""
    if tokens < 2:
        raise RuntimeInputError(f"--tokens must be at least 2, got {tokens}")
    ids = tokenizer.encode(stdlib_text(modules), add_special_tokens=False)
    if len(ids) < tokens:
        raise RuntimeInputError(f"the evaluation text has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def make_windows(ids: Sequence[int], *, window: int, bos_id: int | None) -> list[np.ndarray]:
    """Non-overlapping windows [1, n] int64, each `bos_id` followed by the next window-1 text tokens
    (window tokens without a BOS); the last may be shorter. Every text token is a prediction target
    exactly once, predicted from the tokens before it in its window."""
    head = [] if bos_id is None else [int(bos_id)]
    step = window - len(head)
    if step < 1:
        raise RuntimeInputError(f"--window must be at least {len(head) + 1}, got {window}")
    out = []
    for start in range(0, len(ids), step):
        chunk = head + [int(i) for i in ids[start:start + step]]
        if len(chunk) >= 2:
            out.append(np.asarray([chunk], dtype=np.int64))
    return out


# -- scores -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scores:
    """One candidate over the evaluation windows; kl_mean / top1 are None without a reference."""

    tokens: int
    nll: float
    kl_mean: float | None = None
    top1: float | None = None

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "ppl": self.ppl, "nll": self.nll, "kl_mean": self.kl_mean, "top1": self.top1}


@dataclasses.dataclass
class Evaluation:
    scores: Scores
    logprobs: list[np.ndarray] | None = None  # per window [n-1, V] float64, when kept (the reference P)


def evaluate(fn: LogitsFn, windows: Sequence[np.ndarray], *, reference: Sequence[np.ndarray] | None = None,
             keep_logprobs: bool = False, progress: Progress = SILENT) -> Evaluation:
    """Teacher-forced scores of `fn` over `windows`: one forward per window, position t predicting
    token t+1. With `reference` (another evaluation's kept log-probs, P), also KL(P || fn) and top-1."""
    if reference is not None and len(reference) != len(windows):
        raise ValueError(f"reference has {len(reference)} windows, evaluation {len(windows)}")
    nll = kl = 0.0
    hits = n = 0
    kept = [] if keep_logprobs else None
    for w, ids in enumerate(progress.track(windows, f"score {len(windows)} windows")):
        logits = np.asarray(fn(ids))
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits of shape {logits.shape} for input ids {ids.shape}")
        lq = log_softmax(logits[0, :-1])
        targets = ids[0, 1:]
        nll -= float(lq[np.arange(len(targets)), targets].sum())
        n += len(targets)
        if reference is not None:
            lp = reference[w]
            kl += float(kl_of_logprobs(lp, lq).sum())
            hits += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        if kept is not None:
            kept.append(lq)
    scores = Scores(tokens=n, nll=nll / n, kl_mean=kl / n if reference is not None else None,
                    top1=hits / n if reference is not None else None)
    return Evaluation(scores, kept)


def greedy_answer(fn: LogitsFn, prompt: Sequence[int], *, max_new_tokens: int = 12,
                  stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no KV cache, so any
    `LogitsFn` works; short answers only)."""
    ids = [int(i) for i in prompt]
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(fn(np.asarray([ids + new], dtype=np.int64))[0, -1]))
        if nxt in stop_ids:
            break
        new.append(nxt)
    return new


def france_answer(fn: LogitsFn, tokenizer: Any, *, max_new_tokens: int = 12) -> str:
    """The greedy answer to the France chat prompt (the check is whether it still says Paris)."""
    stops = [i for i in (tokenizer.eos_token_id, tokenizer.backend.token_to_id("<|im_end|>")) if i is not None]
    new = greedy_answer(fn, tokenizer.chat_ids(FRANCE_PROMPT), max_new_tokens=max_new_tokens, stop_ids=stops)
    return tokenizer.decode(new)


# -- candidates ----------------------------------------------------------------------------------------
def torch_logits_fn(model: Any) -> LogitsFn:
    """An edgellama `Llama` (export/model.py) as a LogitsFn: one prefill from an empty cache."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(ids, dtype=np.int64)
        t = torch.from_numpy
        with torch.inference_mode():
            logits, _ = model(t(np.ascontiguousarray(ids, dtype=np.int64)), t(mask),
                              t(contract.positions_from_mask(mask)), model.empty_cache(ids.shape[0]))
        return logits.float().numpy()

    return run


def folder_logits_fn(folder: str | Path, *, provider: str = "cpu", threads: int | None = None) -> LogitsFn:
    """One of our model folders as a LogitsFn through parity's OrtSide, which runs both KV cache
    contracts (a static folder on its all-positions graph) on any provider."""
    from edgellama.check.parity_sides import OrtSide

    side = OrtSide(Path(folder), provider=provider, threads=threads, verify=False)

    def run(ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(ids, dtype=np.int64)
        return side.forward(ids, mask, contract.positions_from_mask(mask), side.empty_past(ids.shape[0]))[0]

    return run


def ort_logits_fn(model_path: str | Path, *, num_kv_heads: int, head_dim: int, threads: int | None = None) -> LogitsFn:
    """A plain onnxruntime CPU session as a LogitsFn, for our folders and onnxruntime-genai's builder
    output alike: attention_mask of ones, position_ids (when the graph has it) from that mask, every
    `past_key_values.*` input empty [1, kv_heads, 0, head_dim]. The graph of a static-KV-cache folder
    (its manifest says so) takes whole cache buffers instead: `folder_logits_fn` runs it."""
    import onnxruntime as ort

    from edgellama import folder as model_folder
    from edgellama.runtime.session import session_options

    folder = Path(model_path).parent
    if (folder / model_folder.MANIFEST).is_file() and model_folder.read_manifest(folder).kv_cache == "static":
        return folder_logits_fn(folder, threads=threads)
    sess = ort.InferenceSession(str(model_path), session_options(threads=threads), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    unknown = [n for n in inputs if n not in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS)
               and n not in past]
    if unknown or contract.INPUT_IDS not in inputs:
        raise RuntimeInputError(f"{model_path}: unexpected graph inputs {unknown or list(inputs)}")
    # A bare graph (the builder's output has no manifest): its declared past type is the only
    # record of its KV dtype.
    kv_dtype = np.float16 if past and inputs[past[0]].type == "tensor(float16)" else np.float32

    def run(ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(ids, dtype=np.int64)
        feed = {contract.INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64),
                contract.ATTENTION_MASK: mask, contract.POSITION_IDS: contract.positions_from_mask(mask)}
        empty = contract.empty_past(batch=ids.shape[0], n_layers=len(past) // 2, kv_heads=num_kv_heads,
                                    head_dim=head_dim, dtype=kv_dtype)
        feed.update(zip(past, empty))    # every past input is alike: empty, [B, kv_heads, 0, head_dim]
        return sess.run([contract.LOGITS], {k: v for k, v in feed.items() if k in inputs})[0]

    return run


def onnx_size(folder: str | Path) -> int:
    """Bytes on disk of a model folder's ONNX graph and its external data (*.onnx, *.data)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".data")))


# -- de-gridding ---------------------------------------------------------------------------------------
def block_steps(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Per-weight quantization step |d| [rows, cols] of a GGUF tensor's raw bytes [rows, row_bytes].

    ggml's block layouts (ggml-common.h): Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles for 32
    weights (w = d*q + m, q in 0..15); Q8_0 = fp16 d, 32 int8 (w = d*q).
    """
    sizes = {"Q4_1": 20, "Q8_0": 34}
    if qtype not in sizes:
        raise ValueError(f"no block step for GGUF type {qtype}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, sizes[qtype])
    d = np.abs(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # [rows, blocks]
    return np.repeat(d, 32, axis=1)


def gguf_steps(path: str | Path) -> dict[str, np.ndarray]:
    """{HF weight name: per-weight step in HF layout} for every Q4_1 / Q8_0 tensor of a llama GGUF,
    with attn_q / attn_k rows un-permuted exactly as the loader un-permutes the weights."""
    import gguf

    from edgellama.export.gguf_source import hf_weight_name, unpermute_rows

    reader = gguf.GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_field = reader.fields.get("llama.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    out = {}
    for t in reader.tensors:
        if t.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        name = hf_weight_name(t.name)
        if name is None:
            raise ValueError(f"{path}: {t.name} is not a weight of a llama model")
        step = block_steps(t.data, t.tensor_type.name)
        if name.endswith("self_attn.q_proj.weight"):
            step = unpermute_rows(step, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            step = unpermute_rows(step, kv_heads)
        out[name] = step
    return out


def degrid(weights: dict[str, Any], steps: dict[str, np.ndarray], *, seed: int = 0) -> dict[str, Any]:
    """A copy of `weights` (torch or numpy) with U(-step/2, step/2) added to every weight that has a
    step; each tensor's noise comes from its own generator seeded by (seed, crc32(name)), so it does
    not depend on the order or the set of tensors."""
    out = dict(weights)
    for name, step in steps.items():
        w = weights[name]
        if tuple(w.shape) != step.shape:
            raise ValueError(f"{name}: step shape {step.shape} does not match the weight {tuple(w.shape)}")
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        noise = (rng.random(step.shape, dtype=np.float32) - np.float32(0.5)) * step
        if hasattr(w, "numpy"):
            import torch

            out[name] = w + torch.from_numpy(noise).to(w.dtype)
        else:
            out[name] = (np.asarray(w, dtype=np.float32) + noise).astype(np.float32)
    return out


def degrid_gguf(gguf_path: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """Write the de-gridded copy of a Q4_1/Q8_0 llama GGUF as an HF folder (see `degrid`)."""
    from edgellama.export.sources import save_hf_folder

    steps = gguf_steps(gguf_path)
    out = save_hf_folder(str(gguf_path), out, transform=lambda weights: degrid(weights, steps, seed=seed))
    # The folder's safetensors name the source GGUF; this says how the copy differs from it.
    (Path(out) / "DEGRID.txt").write_text(f"de-gridded {Path(gguf_path).name}: U(-d/2, d/2) per weight, "
                                          f"seed {seed}\n", encoding="utf-8")
    return out
