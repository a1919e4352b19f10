"""What the two SiLU forms cost on ONNX Runtime's CPU: a chain of 30 (one per smollm2 layer) on
[rows, 1536] (smollm2's MLP width), one decode row and a 64-token prefill, interleaved rounds in
one process.

    python bench/silu.py [--threads 2] [--rounds 7]

`exact`: x / (1 + exp(-x)), what the export writes (its fp32 accuracy: test_kernel_accuracy.py);
`sigmoid`: x * Sigmoid(x), which ONNX Runtime fuses into one QuickGelu and every quantization mode
writes back (quant/fast_silu.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, WIDTH = 30, 1536


def session(kind: str, rows: int, threads: int) -> ort.InferenceSession:
    nodes, prev = [], "x"
    for i in range(LAYERS):
        if kind == "sigmoid":
            nodes += [helper.make_node("Sigmoid", [prev], [f"s{i}"]), helper.make_node("Mul", [prev, f"s{i}"], [f"y{i}"])]
        else:
            nodes += [helper.make_node("Neg", [prev], [f"n{i}"]), helper.make_node("Exp", [f"n{i}"], [f"e{i}"]),
                      helper.make_node("Add", [f"e{i}", "one"], [f"d{i}"]),
                      helper.make_node("Div", [prev, f"d{i}"], [f"y{i}"])]
        prev = f"y{i}"
    one = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])] if kind == "exact" else []
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, WIDTH])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [rows, WIDTH])], one)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    for rows in (1, 64):
        sessions = {k: session(k, rows, args.threads) for k in ("sigmoid", "exact")}
        x = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for kind, sess in sessions.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    sess.run(None, {"x": x})
                times[kind].append((time.perf_counter() - start) / args.calls * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"rows {rows}: {LAYERS} SiLUs, median ms per call: sigmoid {med['sigmoid']:.3f}, "
              f"exact {med['exact']:.3f} ({med['exact'] - med['sigmoid']:+.3f} ms)")


if __name__ == "__main__":
    main()
