"""Where a decode step's time goes, graph against graph: ONNX Runtime's profiler, one plain loop.

    python bench/profile_step.py out/speed/smollm2-ort-static-int8 out/speed/genai-smollm2-int8
    python bench/profile_step.py A B --prompt-tokens 1024 --new-tokens 64 --rounds 1

Every folder given (ours with the static KV cache contract, or onnxruntime-genai's builder output,
which has the same inputs) runs in one plain IO-binding loop, the same Python for all: one cache
buffer per layer bound as past and present, per step only input_ids and the mask rebound. The
folders take turns step by step (lockstep), so a burst of load on a shared machine hits them all
alike, and ONNX Runtime's intra-op threads do not spin between runs (a spinning pool would take
the core the next folder's step needs). Printed per folder: the median step (wall and process CPU
time), then per op type the kernel time per step, nodes per step and time per node, from
SessionOptions.enable_profiling over every decode step (the prefill left out); lm_head and the
embedding on their own lines. What it isolates is the graph: a loop's own overhead (ours or
genai's C++) is not in these figures; bench/speed.py measures the loops.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class Folder:
    def __init__(self, folder: Path, *, threads: int, profile_dir: Path | None):
        import onnxruntime as ort

        self.folder = folder
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_dir / folder.name)
        self.ort = ort
        self.session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        shape = inputs[self.past[0]].shape
        self.kv_heads, self.head_dim = shape[1], shape[3] if isinstance(shape[3], int) else None
        self.runs = 0   # model runs so far, to tell decode runs from prefills in the profile
        self.decode_runs: list[int] = []

    def steps(self, prompt: list[int], new_tokens: int, head_dim: int):
        """Yields (wall s, cpu s, token) for the prefill, then for each decode step."""
        ort = self.ort
        b = self.session.io_binding()
        b.bind_output("logits")      # first, so get_outputs()[0] is the logits
        for name in self.past:
            buf = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, self.kv_heads, len(prompt) + new_tokens, self.head_dim or head_dim), np.float32))
            b.bind_ortvalue_input(name, buf)
            b.bind_ortvalue_output(name.replace("past_key_values.", "present."), buf)
        ids, total = np.asarray([prompt], np.int64), len(prompt)
        for k in range(new_tokens):
            t, c = time.perf_counter(), time.process_time()
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            b.bind_output("logits")
            self.session.run_with_iobinding(b)
            tok = int(b.get_outputs()[0].numpy()[0, -1].argmax())
            if k:
                self.decode_runs.append(self.runs)
            self.runs += 1
            yield time.perf_counter() - t, time.process_time() - c, tok
            ids, total = np.array([[tok]], np.int64), total + 1

    def op_table(self) -> list[str]:
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        spans = [(runs[i]["ts"], runs[i]["ts"] + runs[i]["dur"]) for i in self.decode_runs if i < len(runs)]
        starts = np.array([s for s, _ in spans])
        by_op, count, named = collections.Counter(), collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
            if i < 0 or e["ts"] > spans[i][1]:
                continue
            op = e["args"].get("op_name")
            by_op[op] += e["dur"]
            count[op] += 1
            node = e["name"][: -len("_kernel_time")]
            if "lm_head" in node or "embed_tokens" in node:
                named[node] += e["dur"]
        n = len(spans)
        model_run = sum(e - s for s, e in spans) / n
        lines = [f"  {n} decode runs: model_run {model_run / 1e3:.2f} ms/step, "
                 f"kernels {sum(by_op.values()) / n / 1e3:.2f} ms/step"]
        lines += [f"  {op:34s} {d / n / 1e3:7.3f} ms/step  {count[op] / n:4.0f} nodes  {d / count[op]:7.1f} us/node"
                  for op, d in by_op.most_common()]
        lines += [f"  {node}: {d / n / 1e3:.3f} ms/step" for node, d in named.most_common()]
        return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true", help="timings only (the profiler costs a little per node)")
    args = ap.parse_args()
    from edgellama.check.bench import bench_prompt

    with tempfile.TemporaryDirectory() as tmp:
        folders = [Folder(f, threads=args.threads, profile_dir=None if args.no_profile else Path(tmp))
                   for f in args.folders]
        head_dim = next((f.head_dim for f in folders if f.head_dim), 64)
        prompt = bench_prompt(49152, args.prompt_tokens)
        wall = [[] for _ in folders]
        cpu = [[] for _ in folders]
        tokens = [[] for _ in folders]
        for rnd in range(args.rounds + 1):          # round 0 warms up
            gens = [f.steps(prompt, args.new_tokens if rnd else 8, head_dim) for f in folders]
            for k in range(args.new_tokens if rnd else 8):
                for i, g in enumerate(gens):
                    w, c, tok = next(g)
                    if rnd and k:
                        wall[i].append(w)
                        cpu[i].append(c)
                    if rnd == args.rounds:
                        tokens[i].append(tok)
        if rnd == 0 or not folders[0].decode_runs:
            return
        for f in folders:      # the warm-up's runs are not decode steps of a measured round
            f.decode_runs = [r for r in f.decode_runs if r >= 8]
        base_w, base_c = statistics.median(wall[0]), statistics.median(cpu[0])
        for i, f in enumerate(folders):
            w, c = statistics.median(wall[i]), statistics.median(cpu[i])
            print(f"== {f.folder}: step {w * 1e3:.3f} ms wall (x{base_w / w:.3f} of the first's speed), "
                  f"{c * 1e3:.3f} ms cpu (x{base_c / c:.3f}); greedy tokens as the first's: {tokens[i] == tokens[0]}")
            if not args.no_profile:
                print("\n".join(f.op_table()))


if __name__ == "__main__":
    main()
