"""Export time and peak RSS, each model in a fresh process (peak RSS is per process).

    python bench/export_bench.py                  # smollm2 and the Llama-3.2-1B shape
    python bench/export_bench.py --models smollm2

Goals (export issue): the 1B shape exports in under 2 minutes on 2 cores with peak RSS under
2x its fp32 weight bytes. The 1B-shaped model has random weights: building it is timed apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, resource, torch
from pathlib import Path
from edgellama import folder as model_folder
from edgellama.export import config as presets, onnx_export
from edgellama.export.model import Llama
name, out, target = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
if name == "smollm2":
    from edgellama.export.sources import load_model
    model, tok, info = load_model("smollm2")
else:
    torch.manual_seed(0)
    with torch.no_grad():
        model = Llama(presets.PRESETS[name]()).eval()
    tok = None
t1 = time.perf_counter()
ir_model = onnx_export.export_onnx(model)
if target != "portable":
    ir_model = onnx_export.lower(ir_model, target=target)
t2 = time.perf_counter()
with model_folder.staged_folder(out, force=True) as tmp:
    model_folder.save_model(ir_model, tmp)
t3 = time.perf_counter()
weights = sum(p.numel() * 4 for p in model.parameters())
print(json.dumps({"model": name, "target": target, "load_or_init_s": t1 - t0, "export_s": t2 - t1,
                  "write_s": t3 - t2, "fp32_weight_bytes": weights,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama3.2-1b-shape")
    ap.add_argument("--target", default="portable")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD, name, str(Path(tmp) / "out"), args.target],
                               capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}: export failed")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
    print(f"{'model':<20} {'target':<9} {'load/init s':>11} {'export s':>9} {'write s':>8} "
          f"{'export+write s':>14} {'peak RSS GiB':>12} {'x fp32 weights':>14}")
    for r in rows:
        print(f"{r['model']:<20} {r['target']:<9} {r['load_or_init_s']:>11.1f} {r['export_s']:>9.1f} "
              f"{r['write_s']:>8.1f} {r['export_s'] + r['write_s']:>14.1f} {r['peak_rss_bytes'] / 2**30:>12.2f} "
              f"{r['peak_rss_bytes'] / r['fp32_weight_bytes']:>14.2f}")
    print(json.dumps(rows))
    _ = resource  # children's RSS is measured inside each child


if __name__ == "__main__":
    main()
