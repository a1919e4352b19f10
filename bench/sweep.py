"""The sweep goal on local Ray: tiny x 3 targets x 4 precisions, one worker killed mid-sweep, a rerun.

    python bench/sweep.py --out out/sweep-bench            # prints the two runs' figures and tables

1. Starts Ray here (ray.init, --cpus CPUs, no dashboard) and runs `edgellama sweep PLAN --ray
   local` in this process while a watcher thread waits for the first cell result in OUT/cells,
   then SIGKILLs one worker that is running a cell (a process titled `ray::run_cell`, the title
   Ray gives a worker while it runs that task; Linux /proc). Expected: exactly one cell failed, at
   stage "worker", every other cell ok.
2. Reruns the same command on the same OUT: only the lost cell runs, and every cell is ok.
Figures: wall time of each run, cells ok / failed / run / resumed, the killed pid and its cell.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

TITLE = b"ray::run_cell"


def say(text: str) -> None:
    print(f"[sweep-bench] {text}", file=sys.stderr, flush=True)


def running_cells() -> list[int]:
    """Pids of Ray workers running a sweep cell now (Ray sets the worker's title to ray::<task>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "cmdline").read_bytes().startswith(TITLE):
                pids.append(int(entry.name))
    return pids


def kill_one_mid_sweep(cells: Path, killed: dict, stop: threading.Event) -> None:
    """After the first result lands, SIGKILL one worker that is running a cell."""
    while not stop.is_set():
        if cells.is_dir() and any(p.suffix == ".json" for p in cells.iterdir()):
            pids = running_cells()
            if pids:
                killed["pid"], killed["at"] = pids[0], time.perf_counter()
                os.kill(pids[0], signal.SIGKILL)
                return
        time.sleep(0.2)


def sweep(plan: Path, out: Path, *, run: int) -> tuple[int, dict, float]:
    """One `edgellama sweep --ray local --json`; its stdout must be exactly the results.json it wrote."""
    from edgellama.cli.main import main

    buf = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(["sweep", str(plan), "-o", str(out), "--ray", "local", "--json"])
    wall = time.perf_counter() - start
    (out.parent / f"run{run}.stdout").write_text(buf.getvalue(), encoding="utf-8")
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    try:
        alone = json.loads(buf.getvalue()) == result
    except ValueError:
        alone = False
    if not alone:
        say(f"run {run}: stdout is not results.json alone (kept in {out.parent / f'run{run}.stdout'})")
    return rc, result, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/sweep-bench"))
    ap.add_argument("--precisions", default="fp32,fp16,int8,int4")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--no-kill", action="store_true", help="only the sweep, no worker killed")
    args = ap.parse_args()
    import ray

    if args.out.exists():
        raise SystemExit(f"{args.out} exists; the benchmark starts from an empty folder")
    args.out.mkdir(parents=True)
    plan = args.out / "plan.json"
    plan.write_text(json.dumps({"sources": ["tiny"], "targets": ["portable", "ort", "onnx23"],
                                "precisions": args.precisions.split(","), "providers": ["cpu"]}))
    out = args.out / "results"
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    say(f"ray.init: {time.perf_counter() - t:.1f} s, {args.cpus} CPUs")
    killed: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=kill_one_mid_sweep, args=(out / "cells", killed, stop), daemon=True)
    try:
        if not args.no_kill:
            watcher.start()
        rc1, first, wall1 = sweep(plan, out, run=1)
        stop.set()
        lost = [r for r in first["cells"] if r["status"] != "ok"]
        say(f"run 1: exit {rc1}, {wall1:.1f} s wall, {first['summary']}")
        for r in lost:
            say(f"  failed: {r['cell']} at {r['stage']}: {r['error']}")
        if killed:
            say(f"  killed pid {killed['pid']}")
        rc2, second, wall2 = sweep(plan, out, run=2)
        say(f"run 2 (rerun): exit {rc2}, {wall2:.1f} s wall, {second['summary']}")
    finally:
        ray.shutdown()
    print((out / "results.md").read_text(encoding="utf-8"))
    goal = (killed.get("pid") is not None and len(lost) == 1 and lost[0]["stage"] == "worker"
            and second["summary"]["ran"] == 1 and second["summary"]["failed"] == 0)
    print(f"- run 1: {first['summary']['ok']} ok, {first['summary']['failed']} failed "
          f"({', '.join(r['cell'] + ' at ' + str(r['stage']) for r in lost) or 'none'}), {wall1:.1f} s wall")
    print(f"- run 2: {second['summary']['ran']} run, {second['summary']['resumed']} resumed, "
          f"{second['summary']['failed']} failed, {wall2:.1f} s wall")
    print(f"- goal (a killed worker loses only its cell; a rerun completes it): {'met' if goal else 'MISSED'}")


if __name__ == "__main__":
    main()
