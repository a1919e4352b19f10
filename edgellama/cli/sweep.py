"""Run a plan of checks: sources x targets x precisions x providers, locally or on Ray.

PLAN is a JSON (or, on Python 3.11+, TOML) file; see samples/sweep-tiny.json:
  sources     built-in names (tiny, smollm2), checkpoint folders, .gguf files (relative to the plan)
  targets     portable, ort, onnx23
  precisions  fp32, fp16, int8, int8-dynamic, int4
  providers   cpu, cuda (default cpu)
  parity      {"decode_steps": N, "prompts": [...]}; quality: {"text": FILE, "tokens": N, "window": N}
  threads     ONNX Runtime threads of a cell, and the CPUs a Ray task asks for (default 1)
Each cell exports the source, quantizes it (unless fp32), checks parity against torch and measures
quality (perplexity, KL, top-1 against fp32 torch). OUT/cells/<cell>.json holds each cell's record,
written as the cell finishes; OUT/results.json and OUT/results.md the merged results. A rerun with
the same OUT skips the cells already ok and runs the failed ones again.

Without --ray the cells run here, one after another. --ray ADDRESS runs each cell as a Ray task
(`pip install 'edgellama[ray]'`): `local` starts Ray on this machine, `auto` joins the cluster of
`ray start`, ray://HOST:10001 connects through Ray Client; cuda cells ask for a GPU each.

Exit status: 0 every cell ok, 1 a cell failed (its error is in its record), 2 a bad plan or OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", metavar="PLAN", type=Path, help="plan file (.json or .toml)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="results folder (new, or a previous sweep's to resume it)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the cells as Ray tasks: local, auto or ray://HOST:PORT")
    p.add_argument("--json", action="store_true", help="print the merged results as one JSON object")
    p.add_argument("--markdown", type=Path, metavar="FILE",
                   help="append the results table, e.g. --markdown \"$GITHUB_STEP_SUMMARY\"")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from edgellama.check.sweep import RESULTS_JSON, RESULTS_MD, run_sweep, write_atomic
    from edgellama.check.sweep_plan import load_plan
    from edgellama.cli.output import print_json
    from edgellama.errors import CheckFailed, EdgellamaError

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[edgellama] {msg}", file=sys.stderr, flush=True)

    plan = load_plan(args.plan)
    if args.markdown:   # refused now, not after an hour of cells
        try:
            open(args.markdown, "a", encoding="utf-8").close()
        except OSError as e:
            raise EdgellamaError(f"cannot write the markdown summary {args.markdown}: {e.strerror or e}") from None
    # stdout carries the table or the JSON alone: whatever a library prints meanwhile (Ray's driver
    # reporting a dead worker) goes to stderr with the progress lines.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_sweep(plan, out=args.output, ray=args.ray, progress=say)
    text = io.StringIO()
    print_json("sweep", result, stream=text)   # results.json is what --json prints
    write_atomic(args.output / RESULTS_JSON, text.getvalue())
    table = (args.output / RESULTS_MD).read_text(encoding="utf-8")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(table)
    if args.json:
        sys.stdout.write(text.getvalue())
    elif not args.quiet:
        print(table, end="")
    s = result["summary"]
    if s["failed"]:
        failed = [r["cell"] for r in result["cells"] if r["status"] != "ok"]
        raise CheckFailed(f"{s['failed']} of {s['cells']} cells failed: {', '.join(failed)}")
    return 0
