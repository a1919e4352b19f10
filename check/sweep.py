"""`edgellama sweep`: every cell of a plan (check/sweep_plan.py), locally or on Ray, into one folder.

    plan = load_plan("samples/sweep-tiny.json")
    result = run_sweep(plan, out="sweep-out")                  # cells one after another, here
    result = run_sweep(plan, out="sweep-out", ray="auto")      # one Ray task per cell

OUT holds `plan.json` (the checked plan: it marks the folder as a sweep's), `cells/<cell>.json`
(one record per cell, written atomically as the cell finishes) and `results.md` (the merged
markdown table, for a CI summary); `edgellama sweep` adds the merged `results.json` (schema
`edgellama.sweep`, the shape of every command's --json, which the CLI layer owns). A rerun skips
every cell whose record says ok for the same key (source, target, precision, provider, settings);
failed cells run again, so a cell lost with its worker is completed by the next run.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellama.check.sweep_cell import run_cell
from edgellama.check.sweep_plan import Cell, Plan
from edgellama.errors import EdgellamaError

PLAN_FILE = "plan.json"
CELLS = "cells"
RESULTS_JSON = "results.json"   # written by edgellama/cli/sweep.py
RESULTS_MD = "results.md"


def write_atomic(path: Path, text: str) -> None:
    """`text` at `path`, never half-written: a temp file beside it renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare(out: Path, plan: Plan) -> None:
    if out.exists() and not out.is_dir():
        raise EdgellamaError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN_FILE).is_file():
        raise EdgellamaError(f"{out} is not empty and holds no sweep ({PLAN_FILE}); choose a new or a sweep's folder")
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    write_atomic(out / PLAN_FILE, json.dumps(plan.to_dict(), indent=2) + "\n")


def _stored(out: Path, cell: Cell) -> dict[str, Any] | None:
    try:
        record = json.loads((out / CELLS / f"{cell.id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_done(record: dict[str, Any] | None, cell: Cell) -> bool:
    return bool(record) and record.get("status") == "ok" and record.get("key") == cell.key()


def run_local(cells: list[Cell], *, on_result: Callable[[dict[str, Any]], None]) -> None:
    """The cells one after another in this process, through the package's Python APIs."""
    for cell in cells:
        on_result(run_cell(cell))


def run_sweep(plan: Plan, *, out: Path | str, ray: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the plan's cells not done yet in OUT, locally or (`ray`: an address, "auto" or "local")
    as Ray tasks; returns the merged result (its table also written to OUT/results.md)."""
    say = progress or (lambda _msg: None)
    out = Path(out)
    if ray is None:
        _prepare(out, plan)
        return _run(plan, out, ray=None, execute=run_local, say=say)
    from edgellama.check.sweep_ray import connected, run_on_ray

    with connected(ray):   # a missing Ray or a bad address is refused before OUT is touched
        _prepare(out, plan)
        return _run(plan, out, ray=ray, execute=functools.partial(run_on_ray, progress=say), say=say)


def _run(plan: Plan, out: Path, *, ray: str | None, execute: Callable[..., None],
         say: Callable[[str], None]) -> dict[str, Any]:
    cells = plan.cells()
    records = {c.id: _stored(out, c) for c in cells}
    pending = [c for c in cells if not is_done(records[c.id], c)]
    resumed = {c.id for c in cells} - {c.id for c in pending}
    if resumed:
        say(f"{len(resumed)} of {len(cells)} cells already done in {out}: skipped")
    start = time.perf_counter()
    finished = 0

    def on_result(record: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        write_atomic(out / CELLS / f"{record['cell']}.json", json.dumps(record, indent=2, default=str) + "\n")
        records[record["cell"]] = record
        how = "ok" if record["status"] == "ok" else f"FAILED at {record['stage']}: {record['error']}"
        say(f"[{finished}/{len(pending)}] {record['cell']}: {how} ({record['seconds'].get('total', 0):.1f} s)")

    execute(pending, on_result=on_result)
    merged = [{**records[c.id], "resumed": c.id in resumed} for c in cells]
    result = {"plan": str(plan.path), "out": str(out.absolute()), "executor": "ray" if ray else "local",
              "ray_address": ray, "wall_seconds": round(time.perf_counter() - start, 3),
              "summary": {"cells": len(cells), "ok": sum(r["status"] == "ok" for r in merged),
                          "failed": sum(r["status"] != "ok" for r in merged), "ran": len(pending),
                          "resumed": len(resumed)},
              "cells": merged}
    write_atomic(out / RESULTS_MD, markdown(result))
    return result


# -- the table ----------------------------------------------------------------------------------------
def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    """One row per cell: verdict, parity and quality figures, size, time, the error of a failed cell."""
    s = result["summary"]
    lines = [f"### edgellama sweep: {s['ok']} of {s['cells']} cells ok, {s['failed']} failed "
             f"({result['executor']}, {s['ran']} run, {s['resumed']} resumed)", "",
             "| cell | status | parity KL mean | parity max rel | greedy match | quality KL | top-1 | ppl "
             "(torch) | MB | s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["cells"]:
        p, q = r.get("parity") or {}, r.get("quality") or {}
        ppl = f"{q['ppl']:.3f} ({q['reference_ppl']:.3f})" if q else "—"
        mb = _num(r["model_bytes"] / 1e6 if r.get("model_bytes") else None, ".2f")
        error = (f"{r['stage']}: {r['error']}" if r.get("error") else "").replace("|", "\\|")
        status = ("ok" if r["status"] == "ok" else "**FAILED**") + (" (resumed)" if r.get("resumed") else "")
        lines.append(f"| {r['cell']} | {status} | {_num(p.get('kl_mean'), '.2e')} | {_num(p.get('max_rel'), '.2e')} "
                     f"| {_num(p.get('greedy_match'), '.2f')} | {_num(q.get('kl_mean'), '.2e')} "
                     f"| {_num(q.get('top1'), '.3f')} | {ppl} | {mb} | {_num(r['seconds'].get('total'), '.1f')} "
                     f"| {error} |")
    return "\n".join(lines) + "\n"
