"""Check that an exported model computes what its reference computes: torch or another folder.

Runs the same token streams on both sides: logits at prefill and at every decode step through the
KV cache (teacher-forced on the reference's greedy tokens, so one early flip does not cascade),
the present KV cache, and free-running greedy generations. Metrics: max abs / relative / 99.9th
percentile error, cosine, mean and max KL of the next-token distribution, top-1 / top-5
agreement, and the step where greedy decoding first diverges. Tolerances follow the model's
precision (fp32, fp16, int8, int4; see --tolerance). On a failure the first block (RMSNorm, RoPE,
attention, MLP) whose output leaves tolerance is named with its layer.

Beyond optimum's export validation (one random input, atol only), polygraphy (no KL, top-k or
decode metrics) and onnxruntime's llama_parity (signed max difference only): real prompts,
left-padded batches, decode steps through the cache, distribution metrics, localization.

Prints the metrics table. --json FILE writes the report (schema "edgellama.parity", version 1,
fields in docs/parity-schema.md) to FILE; --json - prints it to stdout instead of the table.
A report path whose folder is missing is refused before the check runs.

Exit status: 0 pass, 1 fail, 2 error (missing or corrupted model, bad arguments).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellama.check.parity_tolerances import PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path, help="exported model folder to check")
    p.add_argument("--reference", default="torch", metavar="torch|OTHER_MODEL",
                   help="torch: the fp32 torch blocks of the source recorded in MODEL's manifest (default); "
                        "or another model folder (e.g. the fp32 export when MODEL is int8)")
    p.add_argument("--providers", default="cpu", metavar="P[,P]",
                   help="comma-separated providers MODEL runs on, one comparison each (cpu, cuda; default cpu)")
    p.add_argument("--reference-provider", default="cpu", choices=["cpu", "cuda"],
                   help="provider of a folder reference (default cpu): MODEL --reference MODEL --providers cuda "
                        "compares CUDA against CPU")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt per line (default: built-in prompts)")
    p.add_argument("--decode-steps", type=int, default=8, metavar="N", help="decode steps after prefill (default 8)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="tolerance table to use (default: read from the manifests' dtype and quantization)")
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                   help="override one tolerance (repeatable), e.g. kl_mean=1e-3 or greedy_match=none")
    p.add_argument("--no-localize", action="store_true", help="on a failure, do not rerun to find the first bad block")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write the report as JSON (docs/parity-schema.md) to FILE, or to stdout for `-`")
    p.add_argument("--markdown", type=Path, metavar="FILE",
                   help="append a markdown summary, e.g. --markdown \"$GITHUB_STEP_SUMMARY\"")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines and no table (exit status, and one line on stderr when it fails)")


def run(args: argparse.Namespace) -> int:
    from edgellama.check import parity, parity_report
    from edgellama.check.parity_tolerances import parse_overrides
    from edgellama.cli.output import json_object, print_json
    from edgellama.errors import CheckFailed
    from edgellama.progress import Progress

    to_stdout = args.json is not None and str(args.json) == "-"
    json_file = None if to_stdout else args.json
    # Before the check: a report that cannot be written would turn a finished check into an error.
    parity_report.check_paths(json_path=json_file, markdown_path=args.markdown)
    overrides = parse_overrides(args.tolerance)
    prompts = parity.read_prompts(args.prompts) if args.prompts else None
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]

    report = parity.run_parity(args.model, reference=args.reference, providers=providers,
                               reference_provider=args.reference_provider, prompts=prompts,
                               decode_steps=args.decode_steps, tolerances=overrides, precision=args.precision,
                               localize_failures=not args.no_localize, threads=args.threads,
                               progress=Progress(enabled=not args.quiet))
    report = json_object("parity", report, version=report["schema_version"])
    parity_report.write(report, json_path=json_file, markdown_path=args.markdown)
    if to_stdout:
        print_json("parity", report, version=report["version"])
    elif not args.quiet:
        print(parity_report.to_text(report))
    if not parity.report_passed(report):
        failed = [c["provider"] for c in report["comparisons"] if c["status"] != "pass"]
        raise CheckFailed(f"{args.model} against {report['reference']}: parity failed on {', '.join(failed)}")
    return 0
