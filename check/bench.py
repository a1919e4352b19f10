"""Decode speed side by side: edgellama's Generator, transformers eager, onnxruntime-genai.

Every runner answers one question the same way: given a prompt of P token ids, how long does the
prefill take (the prompt's forward pass plus the first token) and how many tokens per second do
the next N-1 steps make (greedy, no early stop). Runners take turns (interleaved runs, after one
warm-up each), so a slow patch of the machine hits all of them; the table shows medians.

The memory-bandwidth limit of a decode step: each new token reads every weight once, so
tokens/s <= bandwidth / weight bytes. Bandwidth is measured here with a large numpy copy
(read + write bytes over time, the best of a few), so the fraction is relative to what this
machine streams, not to a datasheet.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgellama.errors import EdgellamaError, RuntimeInputError

AGAINST = ("torch", "genai", "genai-folder")


@dataclasses.dataclass
class Timing:
    prefill_ms: float
    decode_tokens_per_s: float
    tokens: list[int]
    step_ms: list[float] = dataclasses.field(default_factory=list)   # each decode step, where timed


@dataclasses.dataclass
class Row:
    """One runner's medians, with the bandwidth bound of its weights."""

    name: str
    precision: str
    weight_bytes: int
    prefill_ms: float
    decode_tokens_per_s: float
    runs: int
    bound_tokens_per_s: float = 0.0
    fraction_of_bound: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    note: str = ""
    step_ms_median: float = 0.0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- memory bandwidth ---------------------------------------------------------------------------------
def measure_bandwidth(*, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one core streams: a numpy copy of `megabytes` MB, read + write, best of `repeats`."""
    n = megabytes * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)     # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


# -- runners --------------------------------------------------------------------------------------------
class Runner:
    name = "runner"
    precision = "fp32"
    weight_bytes = 0
    note = ""

    def run(self, prompt: list[int], new_tokens: int) -> Timing:  # pragma: no cover - interface
        raise NotImplementedError


class OursRunner(Runner):
    """edgellama's Generator on an exported folder."""

    def __init__(self, folder: Path, *, provider: str = "cpu", threads: int | None = None, loop: str | None = None,
                 name: str | None = None):
        from edgellama.runtime.generator import Generator

        self.gen = Generator(folder, provider=provider, threads=threads, loop=loop)
        m = self.gen.model
        self.name = name or f"edgellama ({m.manifest.target}, {self.gen.loop_mode})"
        self.precision = m.manifest.precision
        self.weight_bytes = m.weight_bytes

    def run(self, prompt, new_tokens):
        r = self.gen.generate_ids(prompt, max_new_tokens=new_tokens, eos=False)[0]
        return Timing(r.prefill_ms, r.decode_tokens_per_s, r.token_ids)


class LoopRunner(Runner):
    """Our KV loop (runtime/kv_loop.py, either contract) driven greedily with every decode step
    timed: what the Generator runs, less sampling. `session_config` goes to ONNX Runtime (e.g.
    {"session.intra_op.allow_spinning": "0"})."""

    def __init__(self, folder: Path, *, threads: int | None = None, name: str | None = None,
                 session_config: dict[str, str] | None = None):
        from edgellama.runtime import kv_loop
        from edgellama.runtime.session import OrtModel

        self.kv_loop = kv_loop
        self.model = OrtModel(folder, provider="cpu", threads=threads, session_config=session_config)
        self.name = name or f"edgellama ({self.model.manifest.target}, {self.model.kv_cache} cache)"
        self.precision = self.model.manifest.precision
        self.weight_bytes = self.model.weight_bytes

    def run(self, prompt, new_tokens):
        loop = self.kv_loop.make_loop(self.model, 1, capacity=len(prompt) + new_tokens)
        ids, mask = np.asarray([prompt], np.int64), np.ones((1, len(prompt)), np.int64)
        pos = np.arange(len(prompt), dtype=np.int64)[None]
        t = time.perf_counter()
        tok = loop.step(ids, mask, pos).argmax(-1)
        prefill = time.perf_counter() - t
        tokens, steps = [int(tok[0])], []
        for k in range(new_tokens - 1):
            t = time.perf_counter()
            mask = np.ones((1, len(prompt) + k + 1), np.int64)
            tok = loop.step(tok[:, None].astype(np.int64), mask, pos[:, -1:] + k + 1).argmax(-1)
            steps.append(time.perf_counter() - t)
            tokens.append(int(tok[0]))
        return Timing(prefill * 1e3, len(steps) / sum(steps) if steps else 0.0, tokens, [s * 1e3 for s in steps])


class TorchRunner(Runner):
    """transformers' LlamaForCausalLM, eager attention, fp32, the folder's source weights.

    A hand-written greedy loop over `past_key_values` (what `generate` does inside), so the
    prefill and the decode steps are timed apart exactly as for the other runners.
    """

    name = "transformers eager"

    def __init__(self, folder: Path, *, threads: int | None = None, model: Any = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = model if model is not None else transformers_model(folder)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt, new_tokens):
        torch = self.torch
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            prefill = time.perf_counter() - t
            tokens = [int(tok)]
            past = out.past_key_values
            t = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(tok))
            decode = time.perf_counter() - t
        return Timing(prefill * 1e3, (new_tokens - 1) / decode if decode > 0 else 0.0, tokens)


def transformers_twin(model: Any) -> Any:
    """transformers' class of our torch model's family (LlamaForCausalLM, Qwen2ForCausalLM, ...) with
    its weights, loaded strictly, eager attention, fp32."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    cfg = transformers.AutoConfig.for_model(**model.config.to_hf())
    cfg._attn_implementation = "eager"
    with no_init_weights():              # every weight is overwritten just below: skip the random init
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise EdgellamaError(f"weights do not map onto transformers' {type(hf).__name__} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return hf.to(torch.float32)


def transformers_model(folder: Path) -> Any:
    """transformers' model of the folder's source family holding the same weights (eager, fp32)."""
    from edgellama import folder as model_folder
    from edgellama.export.sources import load_model

    ours, _, _ = load_model(model_folder.read_manifest(folder).source_spec)
    return transformers_twin(ours)


def _genai():
    try:
        import onnxruntime  # noqa: F401  # onnxruntime-genai finds the ONNX Runtime library already loaded
        import onnxruntime_genai as og
    except ImportError as e:
        raise EdgellamaError(f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai") from None
    return og


class GenaiRunner(Runner):
    """onnxruntime-genai's `Generator` on a folder with genai_config.json (ours, or its builder's output)."""

    def __init__(self, folder: Path, *, name: str, precision: str, provider: str = "cpu",
                 threads: int | None = None, session_config: dict[str, str] | None = None):
        og = _genai()
        self.og = og
        try:
            config = og.Config(str(folder))
        except RuntimeError as e:   # genai reports every config problem as a bare RuntimeError
            raise EdgellamaError(f"onnxruntime-genai cannot load {folder}: {str(e).splitlines()[0]}") from None
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        options = dict(session_config or {})   # genai hands keys it does not know to ONNX Runtime
        if threads:
            options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.name, self.precision = name, precision
        self.weight_bytes = sum(p.stat().st_size for p in Path(folder).iterdir()
                                if p.name.endswith((".onnx", ".onnx.data", ".data")))

    def run(self, prompt, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        n = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        gen = og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))   # the prompt's forward pass
        gen.generate_next_token()                                  # the first token, from those logits
        prefill = time.perf_counter() - t
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        decode = sum(steps)
        tokens = [int(x) for x in gen.get_sequence(0)[len(prompt):]]
        return Timing(prefill * 1e3, (new_tokens - 1) / decode if decode > 0 else 0.0, tokens,
                      [x * 1e3 for x in steps])


def our_folder(source: str, out: Path, *, precision: str, target: str = "ort", kv_cache: str | None = None,
               lm_head_bits: int | None = None, say: Callable[[str], None] = lambda s: None) -> Path:
    """Our export of `source` for `target` (and `kv_cache`, None: the target's default) at `precision`,
    quantized from the fp32 export, each cached in `out` under a name that says what it is."""
    from edgellama.export.onnx_export import export_model
    from edgellama.quant.api import quantize_folder

    # A source given as a path is named by its last part: the folders stay under `out`.
    stem = f"{Path(source).name}-{target}" + (f"-{kv_cache}" if kv_cache else "")
    fp32 = out / f"{stem}-fp32"
    if not (fp32 / "edgellama.json").is_file():
        say(f"exporting {source} ({target}{f', {kv_cache} KV cache' if kv_cache else ''})")
        export_model(source, fp32, target=target, kv_cache=kv_cache, force=True)
    if precision == "fp32":
        return fp32
    folder = out / f"{stem}-{precision}{'-lm4' if lm_head_bits == 4 else ''}"
    if not (folder / "edgellama.json").is_file():
        say(f"quantizing {folder.name}")
        quantize_folder(fp32, folder, mode=precision, force=True, lm_head_bits=lm_head_bits)
    return folder


def builder_precision(precision: str) -> str:
    """The onnxruntime-genai builder precision our `precision` (a mode or fp32/fp16) is compared
    with: a mode the builder lacks (int4-fast) maps to the precision its folders run at (int4)."""
    from edgellama.folder import pass_precision

    return pass_precision(precision) or precision


def genai_folder(source: str, out: Path, *, precision: str, say: Callable[[str], None] = lambda s: None) -> Path:
    """onnxruntime-genai's builder export of `source` at `builder_precision(precision)` (through a
    Hugging Face folder written once), cached in `out`."""
    from edgellama.export.sources import save_hf_folder

    precision = builder_precision(precision)

    hf = out / f"{Path(source).name}-hf"
    if not (hf / "config.json").is_file():
        say("writing the Hugging Face folder for onnxruntime-genai's builder")
        save_hf_folder(source, hf)
    return build_genai_model(hf, out / f"genai-{Path(source).name}-{precision}", precision=precision)


def build_genai_model(hf_folder: Path, out: Path, *, precision: str, provider: str = "cpu") -> Path:
    """onnxruntime-genai's own export of the same checkpoint (its model builder), cached in `out`."""
    if (out / "genai_config.json").is_file():
        return out
    _genai()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", precision, "-e", provider, "-c", str(out.parent / ".builder-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not (out / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgellamaError(f"onnxruntime-genai's model builder failed: {tail[0]}")
    return out


# -- the benchmark --------------------------------------------------------------------------------------
def bench_prompt(vocab_size: int, n: int, *, seed: int = 0) -> list[int]:
    """A fixed prompt of `n` ordinary token ids (speed does not depend on the words)."""
    if n < 1:
        raise RuntimeInputError(f"--prompt-tokens must be at least 1, got {n}")
    lo = min(100, vocab_size - 1)
    return np.random.default_rng(seed).integers(lo, vocab_size, size=n).tolist()


def run_bench(runners: Sequence[Runner], *, prompt: list[int], new_tokens: int, runs: int = 3,
              bandwidth: float | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Warm every runner up once, then `runs` interleaved rounds; one Row of medians per runner."""
    if new_tokens < 2:
        raise RuntimeInputError(f"--new-tokens must be at least 2 (decode speed needs steps), got {new_tokens}")
    if runs < 1:
        raise RuntimeInputError(f"--runs must be at least 1, got {runs}")
    say = progress or (lambda s: None)
    timings: dict[int, list[Timing]] = {i: [] for i in range(len(runners))}
    for r in runners:
        say(f"warm-up: {r.name}")
        r.run(prompt, min(new_tokens, 8))
    for k in range(runs):
        for i, r in enumerate(runners):
            timings[i].append(r.run(prompt, new_tokens))
            say(f"run {k + 1}/{runs}: {r.name}: {timings[i][-1].decode_tokens_per_s:.1f} tok/s")
    rows = []
    for i, r in enumerate(runners):
        ts = timings[i]
        row = Row(name=r.name, precision=r.precision, weight_bytes=r.weight_bytes, runs=len(ts),
                  prefill_ms=statistics.median(t.prefill_ms for t in ts),
                  decode_tokens_per_s=statistics.median(t.decode_tokens_per_s for t in ts),
                  tokens=ts[-1].tokens, note=r.note,
                  step_ms_median=statistics.median(statistics.median(t.step_ms) for t in ts) if ts[0].step_ms else 0.0)
        if bandwidth and r.weight_bytes:
            row.bound_tokens_per_s = bandwidth / r.weight_bytes
            row.fraction_of_bound = row.decode_tokens_per_s / row.bound_tokens_per_s
        rows.append(row)
    return rows


# The child of `memory_profile`: each phase's resident memory from /proc/self/status. VmHWM, not
# ru_maxrss: Linux carries the forking parent's peak into the child's ru_maxrss across exec, so a
# child forked from a process holding three models reported theirs. RssAnon (heap: copies, arenas,
# caches) and RssFile (mapped files: libraries, mmap'd weights) say what kind of memory a phase adds.
_PROFILE_CHILD = """\
import json, sys
from pathlib import Path

def status():
    fields = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines() if ':' in line)
    kib = lambda k: int(fields[k].split()[0]) if k in fields else 0
    return {'rss': kib('VmRSS'), 'anon': kib('RssAnon'), 'file': kib('RssFile'), 'hwm': kib('VmHWM')}

a = json.loads(sys.argv[1])
phases = [('start', status())]
import onnxruntime   # every runner's engine, so that 'loaded' is the session alone
if a['runner'] == 'generator':
    from edgellama.runtime.generator import Generator
else:
    from edgellama.check import bench
    if a['runner'] == 'genai':
        import onnxruntime_genai
    else:
        from edgellama.runtime import kv_loop, session
phases.append(('imports', status()))
if a['runner'] == 'generator':
    gen = Generator(Path(a['folder']), provider='cpu', threads=a['threads'])
elif a['runner'] == 'loop':
    r = bench.LoopRunner(Path(a['folder']), threads=a['threads'], session_config=a['config'])
else:
    r = bench.GenaiRunner(Path(a['folder']), name='genai', precision='?', threads=a['threads'],
                          session_config=a['config'])
phases.append(('loaded', status()))
if a['runner'] == 'generator':
    gen.generate_ids(a['prompt'], max_new_tokens=a['new_tokens'], eos=False)
else:
    r.run(a['prompt'], a['new_tokens'])
phases.append(('generated', status()))
print(json.dumps(phases))
"""

MEMORY_RUNNERS = ("generator", "loop", "genai")


def memory_profile(runner: str, folder: Path, *, prompt: list[int], new_tokens: int, threads: int | None = None,
                   session_config: dict[str, str] | None = None) -> list[tuple[str, dict[str, float]]]:
    """Resident memory of a fresh process that loads one runner on `folder` and generates once
    (greedy, no early stop), phase by phase: [(phase, {"rss", "anon", "file", "hwm"} in MB)] for
    "start", "imports" (onnxruntime and the runner's modules), "loaded" (the session created, with
    whatever it imports on the way) and "generated"; the last phase's "hwm" is the process's peak.
    Runners: "generator" (runtime.Generator.generate_ids), "loop" (LoopRunner: our KV loop, greedy)
    or "genai" (GenaiRunner), each alone in its process, so none counts another's memory.
    `session_config` goes to the loop and genai runners."""
    if runner not in MEMORY_RUNNERS:
        raise RuntimeInputError(f"unknown memory runner {runner!r}; choose one of {', '.join(MEMORY_RUNNERS)}")
    args = {"runner": runner, "folder": str(folder), "threads": threads, "config": session_config,
            "prompt": list(prompt), "new_tokens": new_tokens}
    proc = subprocess.run([sys.executable, "-c", _PROFILE_CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgellamaError(f"measuring the memory of {runner} on {folder} failed: {tail[0]}")
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(name, {k: v / 1024 for k, v in kib.items()}) for name, kib in phases]   # KiB on Linux


def peak_rss_mb(runner: str, folder: Path, *, prompt: list[int], new_tokens: int, threads: int | None = None,
                session_config: dict[str, str] | None = None) -> float:
    """Peak resident memory (MB) of `memory_profile`'s child process: the runner loaded alone on
    `folder`, generating once."""
    phases = memory_profile(runner, folder, prompt=prompt, new_tokens=new_tokens, threads=threads,
                            session_config=session_config)
    return phases[-1][1]["hwm"]


def format_table(rows: Sequence[Row], *, bandwidth: float | None = None) -> str:
    head = ("runner", "precision", "weights MB", "prefill ms", "decode tok/s", "step ms", "peak RSS MB",
            "bound tok/s", "of bound")
    body = [(r.name, r.precision, f"{r.weight_bytes / 1e6:.0f}", f"{r.prefill_ms:.1f}",
             f"{r.decode_tokens_per_s:.1f}", f"{r.step_ms_median:.3f}" if r.step_ms_median else "-",
             f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-",
             f"{r.bound_tokens_per_s:.0f}" if r.bound_tokens_per_s else "-",
             f"{100 * r.fraction_of_bound:.0f}%" if r.fraction_of_bound else "-") for r in rows]
    widths = [max(len(str(x[c])) for x in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) if c < 2 else str(v).rjust(w) for c, (v, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if bandwidth:
        lines.append(f"memory bandwidth (numpy copy, read+write): {bandwidth / 1e9:.1f} GB/s; "
                     "bound = bandwidth / weight bytes (every weight read once per token)")
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgellamaError("--plot needs matplotlib (pip install 'edgellama[plot]')") from None
    return plt


def check_plot_path(path: Path) -> None:
    """Refuse, before any benchmark runs, a plot that could not be written: no matplotlib, a
    format it cannot write, a missing folder."""
    plt = _pyplot()
    path = Path(path)
    kinds = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if path.suffix.lstrip(".").lower() not in kinds:
        raise EdgellamaError(f"--plot {path}: give a file name ending in one of "
                             f"{', '.join('.' + k for k in sorted(kinds))} (e.g. bench.png)")
    if not path.absolute().parent.is_dir():
        raise EdgellamaError(f"--plot {path}: folder {path.absolute().parent} does not exist")
    if path.is_dir():
        raise EdgellamaError(f"--plot {path} is a folder; give a file name")


# The bars' axis reaches this far above the tallest bar; a bound beyond it is drawn at the top edge
# with its value written out, so that a bound far above what any runner reaches (small models)
# does not shrink the bars to slivers.
_HEADROOM = 1.35


def plot(rows: Sequence[Row], path: Path, *, title: str | None = None) -> Path:
    """`figure(rows, title=title)` saved to `path` (its suffix picks the format); returns `path`."""
    plt = _pyplot()
    fig = figure(rows, title=title)
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise EdgellamaError(f"cannot write the plot {path}: {e}") from None
    finally:
        plt.close(fig)
    return path


def figure(rows: Sequence[Row], *, title: str | None = None) -> Any:
    """A bar chart of decode tokens/s per runner, values on the bars, each bar's memory-bandwidth
    bound marked over it (a matplotlib Figure). `title` (the benchmark's settings) goes under the
    chart's own title."""
    plt = _pyplot()
    speeds = [r.decode_tokens_per_s for r in rows]
    bounds = [r.bound_tokens_per_s for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.9 * len(rows) + 1.5), 5.2))
    x = np.arange(len(rows))
    bars = ax.bar(x, speeds, width=0.6, color="tab:blue", label="decode tokens/s (median of the runs)")
    top = max(speeds) * _HEADROOM if max(speeds, default=0) > 0 else 1.0
    within = [(i, b) for i, b in zip(x, bounds) if 0 < b <= top]
    if within:
        ax.scatter(*zip(*within), marker="_", s=1400, linewidths=2.5, color="tab:red", zorder=3,
                   label="memory-bandwidth bound")
    above = [(i, b) for i, b in zip(x, bounds) if b > top]
    if above:
        edge = top * 0.975
        ax.scatter([i for i, _ in above], [edge] * len(above), marker="^", s=80, color="tab:red", zorder=3,
                   label="memory-bandwidth bound, above the axis (value written)")
        for i, b in above:
            ax.annotate(f"bound {b:,.0f} tok/s", (i, edge), xytext=(0, -9), textcoords="offset points",
                        ha="center", va="top", fontsize=8, color="tab:red")
    ax.bar_label(bars, labels=[_bar_text(r) for r in rows], padding=3, fontsize=8)
    ax.set_ylim(0, top)
    ax.set_xticks(x, [_tick_text(r) for r in rows], fontsize=8)
    ax.set_xlabel("runner (precision, weight bytes)")
    ax.set_ylabel("decode tokens / s (higher is better)")
    ax.set_title("decode speed per runner" + (f"\n{title}" if title else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.26), frameon=False,
              markerscale=0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    return fig


def _tick_text(row: Row) -> str:
    name = row.name.replace(" (", "\n(", 1)   # "edgellama\n(ort, static)": long names side by side overlap
    mb = row.weight_bytes / 1e6
    return f"{name}\n{row.precision}, {mb:,.0f} MB" if mb >= 10 else f"{name}\n{row.precision}, {mb:.2g} MB"


def _bar_text(row: Row) -> str:
    text = f"{row.decode_tokens_per_s:,.1f} tok/s"
    if row.fraction_of_bound:
        pct = 100 * row.fraction_of_bound
        text += f"\n{pct:.0f}% of bound" if pct >= 1 else f"\n{pct:.1g}% of bound"
    return text
