"""One sweep cell: export -> quantize -> parity -> quality, as one JSON-ready record.

`run_cell(cell)` never raises for the cell's own failures: a refused export, a quantization the
target cannot take, a provider that cannot start or a parity check that fails all come back as
status "failed" with the stage and one error line, so the sweep carries on. The model folder is
built in a temporary folder on whichever machine runs the cell and removed afterwards: only the
record travels (a Ray worker needs no shared disk with the driver).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgellama.check.sweep_plan import Cell
from edgellama.errors import CheckFailed, EdgellamaError


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def error_line(e: BaseException) -> str:
    """A user error's own words; any other exception's type too (it is a bug or an environment fault)."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return first if isinstance(e, (EdgellamaError, CheckFailed)) else f"{type(e).__name__}: {first}"


def versions() -> dict[str, str]:
    from edgellama.folder import package_versions

    out = {"python": platform.python_version(), **package_versions()}
    if "ray" in sys.modules:
        out["ray"] = sys.modules["ray"].__version__
    return out


def _timed(seconds: dict[str, float], stage: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[stage] = round(time.perf_counter() - start, 3)
    return out


def parity_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The parity report's verdict and gated figures (the full report is docs/parity-schema.md's)."""
    comp = report["comparisons"][0]
    logits = comp["logits"]["all"]
    failing = [f"{c['quantity']} {c['metric']} {c['value']:.3g} (limit {c['limit']:.3g})"
               for c in comp["checks"] if not c["pass"]]
    return {"status": report["status"], "precision": report["precision"], "kl_mean": logits["kl_mean"],
            "kl_max": logits["kl_max"], "max_rel": logits["max_rel"], "top1": logits["top1"],
            "greedy_match": comp["greedy"]["match_fraction"], "first_divergence": comp["greedy"]["first_divergence"],
            "failing": failing, "seconds": report["seconds"]}


def _quality(cell: Cell, folder: Path) -> dict[str, Any]:
    from edgellama.check import quality
    from edgellama.export.sources import load_model

    s = cell.settings
    model, tokenizer, _ = load_model(cell.source.spec)
    if s.text is not None:
        ids = tokenizer.encode(Path(s.text).read_text(encoding="utf-8"), add_special_tokens=False)[:s.tokens]
    else:
        ids = quality.eval_tokens(tokenizer, tokens=s.tokens)
    windows = quality.make_windows(ids, window=min(s.window, model.config.max_position_embeddings),
                                   bos_id=tokenizer.bos_token_id)
    ref = quality.evaluate(quality.torch_logits_fn(model), windows, keep_logprobs=True)
    logits = quality.folder_logits_fn(folder, provider=cell.provider, threads=s.threads)
    got = quality.evaluate(logits, windows, reference=ref.logprobs).scores
    return {"tokens": got.tokens, "ppl": got.ppl, "reference_ppl": ref.scores.ppl, "kl_mean": got.kl_mean,
            "top1": got.top1}


def new_record(cell: Cell, *, stage: str | None = None, error: str | None = None) -> dict[str, Any]:
    """A cell's record before it ran: status "failed" until the cell proves otherwise. With `error`,
    the record of a cell that never ran to its end (its worker died, no machine could take it)."""
    here = error is None   # a record the driver writes for a lost cell knows nothing of its worker
    return {"cell": cell.id, "key": cell.key(), "source": cell.source.name, "target": cell.target,
            "precision": cell.precision, "provider": cell.provider, "status": "failed", "stage": stage,
            "error": error, "parity": None, "quality": None, "model_bytes": None, "seconds": {},
            "started": _now() if here else None, "host": platform.node() if here else None,
            "pid": os.getpid() if here else None, "versions": versions() if here else None}


def run_cell(cell: Cell) -> dict[str, Any]:
    """The record of one cell (see module docstring); status "ok" only when parity passed."""
    from edgellama.check.parity import run_parity
    from edgellama.check.quality import onnx_size
    from edgellama.export.onnx_export import export_model
    from edgellama.quant.api import quantize_folder

    record = new_record(cell)
    seconds: dict[str, float] = record["seconds"]
    start = time.perf_counter()
    stage = "provider"
    try:
        if cell.provider == "cuda":   # before minutes of export, not after
            from edgellama.runtime.session import resolve_provider

            resolve_provider("cuda")
        with tempfile.TemporaryDirectory(prefix=f"edgellama-sweep-{cell.id}-") as tmp:
            stage = "export"
            folder = _timed(seconds, stage, export_model, cell.source.spec, Path(tmp) / "fp32",
                            target=cell.target, provider=cell.provider)
            if cell.precision != "fp32":   # folder to folder, as `edgellama quantize` runs it
                stage = "quantize"
                folder = _timed(seconds, stage, quantize_folder, folder, Path(tmp) / cell.precision,
                                mode=cell.precision)
            record["model_bytes"] = onnx_size(folder)
            stage = "parity"
            report = _timed(seconds, stage, run_parity, folder, providers=[cell.provider],
                            prompts=cell.settings.prompts, decode_steps=cell.settings.decode_steps,
                            threads=cell.settings.threads)
            record["parity"] = parity_figures(report)
            stage = "quality"
            record["quality"] = _timed(seconds, stage, _quality, cell, folder)
        if record["parity"]["status"] != "pass":
            stage = "parity"
            raise CheckFailed(f"parity failed: {'; '.join(record['parity']['failing'])}")
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one cell's failure is its record; the sweep goes on
        record["stage"], record["error"] = stage, error_line(e)
    seconds["total"] = round(time.perf_counter() - start, 3)
    record["finished"] = _now()
    return record
