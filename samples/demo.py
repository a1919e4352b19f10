"""The main job on the embedded default model, as a user would run it, one CLI command per step.

    python samples/demo.py --out out

Exports SmolLM2-135M-Instruct (portable function ops and the ONNX Runtime lowering), quantizes
it to int8 and int4, asks each the same chat question, and checks parity against torch.
Each command is printed before it runs; the first failing step stops the demo with its exit code.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

QUESTION = "What is the capital of France?"


def step(*args: str) -> None:
    print(f"\n$ edgellama {shlex.join(args)}", flush=True)
    rc = subprocess.run([sys.executable, "-m", "edgellama", *args]).returncode
    if rc:
        sys.exit(rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"))
    out = ap.parse_args().out
    m = {name: str(out / name) for name in ("smollm2", "smollm2-ort", "smollm2-int8", "smollm2-int4")}
    step("export", "smollm2", "-o", m["smollm2"], "--force")
    step("inspect", m["smollm2"])
    step("export", "smollm2", "-o", m["smollm2-ort"], "--target", "ort", "--force")
    step("quantize", m["smollm2-ort"], "-o", m["smollm2-int8"], "--mode", "int8", "--force")
    step("quantize", m["smollm2-ort"], "-o", m["smollm2-int4"], "--mode", "int4", "--force")
    for name in ("smollm2", "smollm2-ort", "smollm2-int8", "smollm2-int4"):
        step("generate", m[name], "--chat", "--prompt", QUESTION, "--max-new-tokens", "32")
    step("parity", m["smollm2-ort"], "--reference", "torch", "--decode-steps", "16")
    step("parity", m["smollm2-int8"], "--reference", m["smollm2-ort"], "--decode-steps", "16")


if __name__ == "__main__":
    main()
