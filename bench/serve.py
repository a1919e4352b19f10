"""Server overhead and concurrency on smollm2: `edgellama serve` through the openai client vs the
Generator in-process.

    .venv/bin/python bench/serve.py [--folder /tmp/serve-smollm2] [--tokens 64] [--rounds 3]

Exports smollm2 once into --folder (reused when present), starts `edgellama serve` on it in a
subprocess, and prints, with medians over interleaved rounds:
  - decode tokens/s streamed through the server vs in-process `Generator.stream` (goal >= 0.9x)
  - time to first token through the server minus the in-process prefill (goal <= 20 ms)
  - 8 concurrent clients: every reply complete and equal to its serial run; tokens/s vs 1 client
  - whether batching would pay: one `generate_ids` batch of the 8 prompts vs the 8 one after another
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
QUESTIONS = ["What is ONNX?", "Name three rivers.", "Why is the sky blue?", "Explain recursion briefly.",
             "What is a KV cache?", "Give a haiku about tea.", "How do magnets work?", "What is 17 times 3?"]


def export_once(folder: Path) -> Path:
    if not (folder / "edgellama.json").exists():
        from edgellama.export.onnx_export import export_model

        export_model("smollm2", folder, target="ort", force=True)
    return folder


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgellama", "serve", f"smollm2={folder}", "--port", "0",
                             "--provider", "cpu", "--parallel", "8", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True)
    url = re.search(r"at (http://\S+/v1)", proc.stderr.readline()).group(1)
    import http.client
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    for _ in range(600):
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.1)
    return proc, url


def in_process(gen, tokens: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) of one streamed reply in this process."""
    stream = gen.stream(PROMPT, chat=True, max_new_tokens=tokens, eos=False)
    for _ in stream:
        pass
    r = stream.result
    return r.prefill_ms, r.decode_tokens_per_s


def through_server(api, tokens: int) -> tuple[float, float]:
    """(time to first token ms, decode tokens/s) of one reply streamed through the server."""
    start = time.perf_counter()
    first = last = None
    n = 0
    for chunk in api.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=tokens, stream=True,
                                             extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage:
            n = chunk.usage.completion_tokens
    # The first content chunk carries the first token; the rest of the tokens arrive over (last - first).
    return (first - start) * 1e3, (n - 1) / (last - first)


def ask(api, question: str, tokens: int) -> tuple[str, int]:
    r = api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                    max_tokens=tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path("/tmp/serve-smollm2"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrent-tokens", type=int, default=32)
    args = p.parse_args()

    import openai

    from edgellama.runtime import Generator

    folder = export_once(args.folder)
    gen = Generator(folder, provider="cpu")
    proc, url = start_server(folder)
    try:
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        through_server(api, 8)
        in_process(gen, 8)      # warm both sides
        local, remote = [], []
        for _ in range(args.rounds):
            local.append(in_process(gen, args.tokens))
            remote.append(through_server(api, args.tokens))
        prefill = statistics.median(x[0] for x in local)
        ttft = statistics.median(x[0] for x in remote)
        tps_local = statistics.median(x[1] for x in local)
        tps_remote = statistics.median(x[1] for x in remote)
        print(f"decode tokens/s: in-process {tps_local:.1f}, through serve {tps_remote:.1f}, "
              f"ratio {tps_remote / tps_local:.3f} (goal >= 0.9)")
        print(f"first token: serve {ttft:.1f} ms, in-process prefill {prefill:.1f} ms, "
              f"difference {ttft - prefill:.1f} ms (goal <= 20)")

        n = args.concurrent_tokens
        t0 = time.perf_counter()
        serial = [ask(api, q, n) for q in QUESTIONS]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            concurrent = list(pool.map(lambda q: ask(openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                                                                   timeout=600), q, n), QUESTIONS))
        t_conc = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(serial, concurrent))
        tokens = sum(c for _, c in concurrent)
        print(f"8 concurrent clients: {same}/8 replies identical to serial, all complete: "
              f"{all(c > 0 for _, c in concurrent)}; throughput {tokens / t_conc:.1f} tokens/s vs 1 client "
              f"{sum(c for _, c in serial) / t_serial:.1f} tokens/s ({t_serial / t_conc:.2f}x)")

        ids = [gen.encode([{"role": "user", "content": q}], chat=True) for q in QUESTIONS]
        t0 = time.perf_counter()
        alone = [gen.generate_ids(i, max_new_tokens=n, eos=False)[0] for i in ids]
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch = gen.generate_ids(ids, max_new_tokens=n, eos=False)
        t_batch = time.perf_counter() - t0
        agree = sum(a.token_ids == b.token_ids for a, b in zip(alone, batch))
        print(f"batching (in-process, {gen.loop_mode} loop): 8 prompts one after another {t_alone:.2f} s, "
              f"one batch of 8 {t_batch:.2f} s ({t_alone / t_batch:.2f}x); rows equal to alone: {agree}/8")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    print(json.dumps({"cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
