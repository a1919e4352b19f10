"""Parity of an exported model folder against torch or another folder: compare, gate, localize.

Both sides consume the same token streams. Prefill logits are compared at every prompt position;
then each decode step feeds both sides the *reference's* greedy token (teacher forcing), so one
early flip does not cascade into unrelated text, and the logits of every step are compared. The
present KV cache after the last step (every slot both sides wrote) is compared too. Free-running
greedy generations are compared separately: the step of their first divergence is reported.

On a failure the worst batch is rerun with every block's output exposed on both sides (RMSNorm,
RoPE q/k, attention, o_proj, post-attention RMSNorm, MLP per layer, final norm); the first block
in execution order whose output leaves `block_rel` is named with its layer.

Entry point: `run_parity(model, reference=..., providers=..., ...) -> dict` (the JSON report,
schema in docs/parity-schema.md); `report_passed(report)` says whether it passed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama.errors import EdgellamaError, ModelFolderError
from edgellama.folder import Manifest
from edgellama.check.parity_tolerances import DIRECTION, REASONS, looser, resolve, within
from edgellama.check.metrics import LOGIT_KEYS, first_divergence, logit_metrics, merge, tensor_metrics
from edgellama.check.parity_sides import probe_keys
from edgellama.contract import left_pad, positions_from_mask

SCHEMA = "edgellama.parity"
SCHEMA_VERSION = 1

# Short fixed English prompts: different lengths, so the padded batch really has left padding.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def add(a, b):",
    "Water boils at",
)


@dataclasses.dataclass
class Batch:
    label: str
    prompts: list[int]           # indices into the prompt list
    input_ids: np.ndarray        # [B, S] int64, left padded
    attention_mask: np.ndarray   # [B, S] int64


# -- prompts -------------------------------------------------------------------------------------
def read_prompts(path: Path | str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgellamaError(f"cannot read prompts from {path}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise EdgellamaError(f"{path} has no prompts (one prompt per line)")
    return prompts


def encode_prompts(prompts: list[str], *, folder: Path | None, config: Any) -> list[list[int]]:
    """Token ids of each prompt with the folder's tokenizer.json (special tokens as its template adds).

    A folder without a tokenizer (the random `tiny` model) gets UTF-8 bytes offset past the first
    3 ids (usually special), modulo the vocabulary: deterministic and inside the vocabulary.
    """
    tok_path = Path(folder) / "tokenizer.json" if folder is not None else None
    if tok_path is not None and tok_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
        ids = [tok.encode(p).ids for p in prompts]
    else:
        ids = [[3 + (b % (config.vocab_size - 3)) for b in p.encode("utf-8")] for p in prompts]
        if config.bos_token_id is not None:
            ids = [[config.bos_token_id] + row for row in ids]
    for p, row in zip(prompts, ids):
        if not row:
            raise EdgellamaError(f"prompt {p!r} encodes to no tokens")
        if max(row) >= config.vocab_size:
            raise EdgellamaError(f"prompt {p!r} encodes to token ids outside the model's vocabulary")
    return ids


def make_batches(token_ids: list[list[int]], *, pad_id: int) -> list[Batch]:
    """Each prompt alone (batch 1), then all of them as one left-padded batch."""
    batches = []
    for i, row in enumerate(token_ids):
        batches.append(Batch(f"prompt {i}", [i], *left_pad([row], pad_id=pad_id)))
    if len(token_ids) > 1:
        ids, mask = left_pad(token_ids, pad_id=pad_id)
        batches.append(Batch("left-padded batch", list(range(len(token_ids))), ids, mask))
    return batches


# -- one batch -------------------------------------------------------------------------------------
def _kv_view(x: np.ndarray) -> np.ndarray:
    """[B, H_kv, T, D] -> [B, T, H_kv*D]: slots lead, so the attention mask [B, T] selects them."""
    b, h, t, d = x.shape
    return np.asarray(x).transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _feed_back(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next decode step's input ids [B, 1] and attention mask (one more valid slot per row)."""
    return tokens[:, None], np.concatenate([mask, np.ones((len(tokens), 1), np.int64)], axis=1)


def teacher_forced(ref: Any, cand: Any, batch: Batch, *, steps: int,
                   probes: bool = False) -> dict[str, Any]:
    """Prefill + `steps` decode steps, both sides fed the reference's greedy tokens.

    Returns per-step logit metrics, KV metrics of the final cache, the reference's greedy tokens
    [B, steps+1] and, with `probes`, per-block tensor metrics for every step.
    """
    ids, mask = batch.input_ids, batch.attention_mask
    b = ids.shape[0]
    ref_past, cand_past = ref.empty_past(b), cand.empty_past(b)
    per_step, tokens, blocks = [], [], {}
    for step in range(steps + 1):
        pos = positions_from_mask(mask, ids.shape[1])
        r_logits, ref_past, r_probes = ref.forward(ids, mask, pos, ref_past, probes=probes)
        c_logits, cand_past, c_probes = cand.forward(ids, mask, pos, cand_past, probes=probes)
        valid = mask[:, -ids.shape[1]:].astype(bool)
        m = logit_metrics(r_logits, c_logits, valid)
        m["step"], m["positions"] = step, int(valid.sum())
        per_step.append(m)
        if probes:
            for key, r in r_probes.items():
                c = c_probes.get(key)
                if c is None:
                    continue
                if c.shape != r.shape and c.size == r.size:
                    c = c.reshape(r.shape)
                if c.shape != r.shape:
                    continue
                r2, c2 = r.reshape(r.shape[0], r.shape[1], -1), c.reshape(c.shape[0], c.shape[1], -1)
                blocks.setdefault(key, []).append(tensor_metrics(r2, c2, valid))
        nxt = r_logits[:, -1].argmax(-1).astype(np.int64)
        tokens.append(nxt)
        if step == steps:
            break
        ids, mask = _feed_back(nxt, mask)
    kv_valid = mask.astype(bool)
    kv = merge([tensor_metrics(_kv_view(rk), _kv_view(ck), kv_valid) for (rk, rv), (ck, cv) in
                zip(ref_past, cand_past) for rk, ck in ((rk, ck), (rv, cv))]) if ref_past else {}
    return {"per_step": per_step, "kv": kv, "tokens": np.stack(tokens, axis=1),
            "blocks": {k: merge(v) for k, v in blocks.items()}}


def free_running(side: Any, batch: Batch, *, steps: int) -> np.ndarray:
    """Greedy tokens [B, steps+1] of one side consuming its own choices (EOS does not stop it)."""
    ids, mask = batch.input_ids, batch.attention_mask
    past, tokens = side.empty_past(ids.shape[0]), []
    for step in range(steps + 1):
        logits, past, _ = side.forward(ids, mask, positions_from_mask(mask, ids.shape[1]), past)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        tokens.append(nxt)
        if step == steps:
            break
        ids, mask = _feed_back(nxt, mask)
    return np.stack(tokens, axis=1)


# -- gating ----------------------------------------------------------------------------------------
LOGIT_CHECKS = ("max_abs", "max_rel", "p999_abs", "cosine", "kl_mean", "kl_max", "top1", "top5")


def checks_for(logits: dict[str, float], kv: dict[str, float], greedy_match: float,
               tol: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row per gated quantity: what was measured, the limit, and whether it passed."""
    rows = []

    def add(quantity, key, metric, value):
        limit = tol.get(key)
        rows.append({"quantity": quantity, "metric": metric, "tolerance_key": key, "value": value,
                     "limit": limit, "direction": DIRECTION[key], "gated": limit is not None,
                     "pass": within(key, value, limit)})

    for key in LOGIT_CHECKS:
        add("logits", key, key, logits[key])
    if kv:
        add("present_kv", "kv_max_rel", "max_rel", kv["max_rel"])
        add("present_kv", "kv_cosine", "cosine", kv["cosine"])
    add("greedy", "greedy_match", "match_fraction", greedy_match)
    return rows


def localize(ref: Any, cand: Any, batch: Batch, *, steps: int, block_rel: float | None,
             n_layers: int) -> dict[str, Any]:
    """Rerun `batch` with every block exposed; name the first block (execution order) past `block_rel`."""
    result = teacher_forced(ref, cand, batch, steps=steps, probes=True)
    limit = block_rel if block_rel is not None else 0.0
    blocks, first = [], None
    for key, layer, block, op in probe_keys(n_layers):
        m = result["blocks"].get(key)
        row = {"key": key, "layer": layer, "block": block, "op": op,
               "reference_name": getattr(ref, "probe_names", {}).get(key),
               "candidate_name": getattr(cand, "probe_names", {}).get(key),
               "compared": m is not None}
        if m is not None:
            row.update({"max_abs": m["max_abs"], "max_rel": m["max_rel"], "cosine": m["cosine"],
                        "pass": m["max_rel"] <= limit})
            if first is None and not row["pass"]:
                first = row
        blocks.append(row)
    return {"batch": batch.label, "block_rel": block_rel, "first_failing": first, "blocks": blocks,
            "note": None if first else "no block output leaves block_rel: the failure comes from a near-tie "
                                       "flip or from the logits projection alone"}


def compare(ref: Any, cand: Any, batches: list[Batch], *, steps: int, tol: dict[str, float | None],
            localize_failures: bool = True) -> dict[str, Any]:
    """One comparison (reference vs one candidate provider) over every batch."""
    start = time.perf_counter()
    all_steps, kvs, greedy_rows, per_batch = [], [], [], []
    for batch in batches:
        tf = teacher_forced(ref, cand, batch, steps=steps)
        cand_tokens = free_running(cand, batch, steps=steps)
        logits = merge([{k: s[k] for k in LOGIT_KEYS} for s in tf["per_step"]],
                         [s["positions"] for s in tf["per_step"]])
        per_batch.append({"batch": batch.label, "logits": logits, "kv": tf["kv"],
                          "steps": [{"step": s["step"], **{k: s[k] for k in ("max_rel", "kl_max", "top1")}}
                                    for s in tf["per_step"]]})
        all_steps += tf["per_step"]
        if tf["kv"]:
            kvs.append(tf["kv"])
        for row, prompt in enumerate(batch.prompts):
            r, c = tf["tokens"][row].tolist(), cand_tokens[row].tolist()
            greedy_rows.append({"batch": batch.label, "prompt": prompt, "reference": r, "candidate": c,
                                "first_divergence": first_divergence(r, c)})
    logits_prefill = merge([{k: s[k] for k in LOGIT_KEYS} for s in all_steps if s["step"] == 0],
                             [s["positions"] for s in all_steps if s["step"] == 0])
    decode = [s for s in all_steps if s["step"] > 0]
    logits_decode = merge([{k: s[k] for k in LOGIT_KEYS} for s in decode], [s["positions"] for s in decode])
    logits_all = merge([{k: s[k] for k in LOGIT_KEYS} for s in all_steps], [s["positions"] for s in all_steps])
    kv = merge(kvs)
    n = steps + 1
    greedy_match = min(((g["first_divergence"] if g["first_divergence"] is not None else n) / n
                        for g in greedy_rows), default=1.0)
    checks = checks_for(logits_all, kv, greedy_match, tol)
    passed = all(c["pass"] for c in checks)
    out = {
        "status": "pass" if passed else "fail",
        "checks": checks,
        "logits": {"prefill": logits_prefill, "decode": logits_decode, "all": logits_all},
        "present_kv": kv,
        "greedy": {"match_fraction": greedy_match, "tokens_per_row": n,
                   "first_divergence": min((g["first_divergence"] for g in greedy_rows
                                            if g["first_divergence"] is not None), default=None),
                   "rows": greedy_rows},
        "batches": per_batch,
        "localization": None,
    }
    if not passed and localize_failures:
        worst = max(range(len(batches)), key=lambda i: (per_batch[i]["logits"]["kl_max"],
                                                        per_batch[i]["logits"]["max_rel"]))
        out["localization"] = localize(ref, cand, batches[worst], steps=steps, block_rel=tol.get("block_rel"),
                                       n_layers=cand.config.num_hidden_layers)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


# -- sides ------------------------------------------------------------------------------------------
def load_torch_reference(manifest: Manifest, *, folder: Path) -> Any:
    """The fp32 torch model of the source the manifest records, after checking its sha256."""
    from edgellama.check.parity_sides import TorchSide
    from edgellama.export.sources import load_model

    source = manifest.source
    try:
        spec = manifest.source_spec
    except ModelFolderError as e:
        raise ModelFolderError(f"{folder}: {e}") from None
    model, _, info = load_model(spec)
    want, got = source.get("sha256"), (info or {}).get("sha256")
    if want and got and want != got:
        raise ModelFolderError(f"{folder}: the source {spec} is not the one this model was exported from "
                               f"(sha256 {got[:12]}, manifest says {want[:12]})")
    if want and not got:
        raise ModelFolderError(f"{folder}: cannot verify source {spec} against the manifest's sha256")
    return TorchSide(model, label=f"torch ({source.get('kind')}:{source.get('name') or spec})")


def _folder_manifest(folder: Path) -> Manifest:
    from edgellama import folder as model_folder

    return model_folder.verify_folder(folder)


def _config_of(manifest: Manifest, folder: Path) -> Any:
    from edgellama.export.config import LlamaConfig

    try:
        return LlamaConfig.from_dict(manifest.config)
    except (KeyError, TypeError) as e:
        raise ModelFolderError(f"{folder}: manifest has no usable config ({e})") from None


# -- entry point -----------------------------------------------------------------------------------
def run_parity(model: Path | str, *, reference: str = "torch", providers: list[str] | tuple[str, ...] = ("cpu",),
               reference_provider: str = "cpu", prompts: list[str] | None = None, decode_steps: int = 8,
               tolerances: dict[str, float | None] | None = None, precision: str | None = None,
               localize_failures: bool = True, threads: int | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare MODEL (a folder) against `reference` ("torch" or another folder) on each provider.

    Returns the JSON-ready report (docs/parity-schema.md). Raises EdgellamaError subclasses for bad
    input (missing/corrupted folders, unknown providers, an unverifiable torch source).
    """
    from edgellama.check.parity_sides import OrtSide

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    model = Path(model)
    if not isinstance(decode_steps, int) or isinstance(decode_steps, bool) or decode_steps < 0:
        raise EdgellamaError(f"--decode-steps must be an integer >= 0, got {decode_steps!r}")
    providers = list(providers) or ["cpu"]
    for p in providers + [reference_provider]:
        if p not in ("cpu", "cuda"):
            raise EdgellamaError(f"unknown provider {p!r}; choose cpu or cuda")
    manifest = _folder_manifest(model)
    config = _config_of(manifest, model)
    cand_precision = manifest.precision
    if reference == "torch":
        ref_precision = "fp32"
        say("loading the torch reference")
        ref_side = load_torch_reference(manifest, folder=model)
        ref_label = "torch"
    else:
        ref_folder = Path(reference)
        ref_manifest = _folder_manifest(ref_folder)
        ref_config = _config_of(ref_manifest, ref_folder)
        if ref_config.to_dict() != config.to_dict():
            raise EdgellamaError(f"{ref_folder} and {model} are different model configurations; "
                                 "parity compares two exports of the same model")
        ref_precision = ref_manifest.precision
        say(f"opening the reference {ref_folder} ({reference_provider})")
        ref_side = OrtSide(ref_folder, provider=reference_provider, threads=threads, verify=False)
        ref_label = str(ref_folder)
    precision = precision or looser(cand_precision, ref_precision)
    tol = resolve(precision, tolerances)
    prompt_list = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    token_ids = encode_prompts(prompt_list, folder=model, config=config)
    longest = max(len(row) for row in token_ids)
    if longest + decode_steps > config.max_position_embeddings:
        raise EdgellamaError(f"the longest prompt ({longest} tokens) plus --decode-steps {decode_steps} runs past "
                             f"the model's context ({config.max_position_embeddings} tokens)")
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    batches = make_batches(token_ids, pad_id=pad)
    comparisons = []
    for provider in providers:
        say(f"comparing {model} ({provider}) against {ref_label}")
        cand = OrtSide(model, provider=provider, threads=threads, verify=False)
        result = compare(ref_side, cand, batches, steps=decode_steps, tol=tol, localize_failures=localize_failures)
        comparisons.append({"provider": provider, "candidate": cand.label, **result})
    passed = all(c["status"] == "pass" for c in comparisons)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "status": "pass" if passed else "fail",
        "model": str(model),
        "reference": ref_label,
        "reference_provider": None if reference == "torch" else reference_provider,
        "precision": precision,
        "precisions": {"model": cand_precision, "reference": ref_precision},
        "tolerances": tol,
        "tolerance_reason": REASONS[precision],
        "decode_steps": decode_steps,
        "prompts": prompt_list,
        "prompt_tokens": [len(t) for t in token_ids],
        "batches": [b.label for b in batches],
        "comparisons": comparisons,
        "seconds": round(time.perf_counter() - start, 3),
    }


def report_passed(report: dict[str, Any]) -> bool:
    return report.get("status") == "pass"
