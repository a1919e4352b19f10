"""Server overhead and concurrency on smollm2: `edgellama serve` through the openai client vs the
Generator in-process.

    .venv/bin/python bench/serve.py [--folder /tmp/serve-smollm2] [--tokens 64] [--rounds 3]

Exports smollm2 once into --folder (reused when present), starts `edgellama serve` on it twice in
subprocesses (the micro-batcher on, as by default, and off: --max-batch 1), and prints, with medians
over interleaved rounds:
  - decode tokens/s streamed through the server vs in-process `Generator.stream` (goal >= 0.9x)
  - time to first token through the server minus the in-process prefill (goal <= 20 ms), on both
    servers (a lone request on the batching one waits out the batch window)
  - 8 concurrent clients on each server: every reply complete and equal to its serial run; tokens/s
    vs 1 client, and the batch sizes the batcher formed (its /health)
  - in-process: one `generate_ids` batch of the 8 prompts vs the 8 one after another
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


def start_server(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgellama", "serve", f"smollm2={folder}", "--port", "0",
                             "--provider", "cpu", "--parallel", "8", "--log-level", "warning", *extra],
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


def health(url: str) -> dict:
    import http.client

    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def concurrent_clients(url: str, tokens: int) -> tuple[list[tuple[str, int]], float]:
    """The 8 questions from 8 clients at once: (replies, seconds from the first request to the last reply)."""
    import openai

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(lambda q: ask(openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                                                            timeout=600), q, tokens), QUESTIONS))
    return replies, time.perf_counter() - t0


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
    proc_off, url_off = start_server(folder, "--max-batch", "1")
    try:
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        api_off = openai.OpenAI(base_url=url_off, api_key="unused", max_retries=0, timeout=600)
        through_server(api, 8)
        through_server(api_off, 8)
        in_process(gen, 8)      # warm every side
        local, remote, remote_off = [], [], []
        for _ in range(args.rounds):
            local.append(in_process(gen, args.tokens))
            remote.append(through_server(api, args.tokens))
            remote_off.append(through_server(api_off, args.tokens))
        prefill = statistics.median(x[0] for x in local)
        tps_local = statistics.median(x[1] for x in local)
        for label, runs in (("batcher on", remote), ("batcher off", remote_off)):
            ttft = statistics.median(x[0] for x in runs)
            tps_remote = statistics.median(x[1] for x in runs)
            print(f"[{label}] decode tokens/s: in-process {tps_local:.1f}, through serve {tps_remote:.1f}, "
                  f"ratio {tps_remote / tps_local:.3f} (goal >= 0.9)")
            print(f"[{label}] first token: serve {ttft:.1f} ms, in-process prefill {prefill:.1f} ms, "
                  f"difference {ttft - prefill:.1f} ms (goal <= 20)")

        n = args.concurrent_tokens
        t0 = time.perf_counter()
        serial = [ask(api_off, q, n) for q in QUESTIONS]
        t_serial = time.perf_counter() - t0
        tps_serial = sum(c for _, c in serial) / t_serial
        # Interleaved rounds, each server's rate its median; every reply checked against the serial run.
        rates: dict[str, list[float]] = {"batcher off": [], "batcher on": []}
        identical = {k: 0 for k in rates}
        complete = {k: True for k in rates}
        before = health(url)["batch_sizes"]
        for _ in range(args.rounds):
            for label, u in (("batcher off", url_off), ("batcher on", url)):
                replies, seconds = concurrent_clients(u, n)
                rates[label].append(sum(c for _, c in replies) / seconds)
                identical[label] += sum(a == b for a, b in zip(serial, replies))
                complete[label] &= all(c > 0 for _, c in replies)
        for label, r in rates.items():
            tps = statistics.median(r)
            print(f"[{label}] 8 concurrent clients: {identical[label]}/{8 * args.rounds} replies identical to "
                  f"serial, all complete: {complete[label]}; throughput {tps:.1f} tokens/s vs 1 client "
                  f"{tps_serial:.1f} tokens/s ({tps / tps_serial:.2f}x)")
        on, off = statistics.median(rates["batcher on"]), statistics.median(rates["batcher off"])
        after = health(url)["batch_sizes"]
        formed = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
        print(f"batcher on vs off, 8 concurrent clients: {on / off:.2f}x tokens/s; batches formed in "
              f"{args.rounds} rounds (rows: batches) {formed}")

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
        for p in (proc, proc_off):
            p.send_signal(signal.SIGTERM)
        for p in (proc, proc_off):
            p.wait(timeout=120)
    print(json.dumps({"cpu_count": os.cpu_count(), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
