"""runtime/bench.py: interleaving, medians, the bandwidth bound, the table, and our runner on the toy model."""

from __future__ import annotations

import pytest

from edgellama.errors import EdgellamaError, ModelFolderError, RuntimeInputError
from edgellama.folder import Manifest
from edgellama.check import bench

from tests.conftest import build_toy


class FakeRunner(bench.Runner):
    def __init__(self, name, speeds, log):
        self.name, self.speeds, self.log = name, list(speeds), log
        self.weight_bytes = 1000

    def run(self, prompt, new_tokens):
        self.log.append(self.name)
        speed = self.speeds.pop(0)
        return bench.Timing(prefill_ms=speed / 10, decode_tokens_per_s=speed, tokens=[len(prompt), new_tokens])


def test_runs_are_interleaved_and_medians_reported():
    log = []
    a = FakeRunner("a", [0, 10, 50, 20], log)     # first value: the warm-up, not counted
    b = FakeRunner("b", [0, 5, 6, 700], log)
    rows = bench.run_bench([a, b], prompt=[1, 2, 3], new_tokens=4, runs=3, bandwidth=10_000)
    assert log == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert [r.decode_tokens_per_s for r in rows] == [20, 6]
    assert rows[0].prefill_ms == 2.0 and rows[0].runs == 3
    assert rows[0].bound_tokens_per_s == 10 and rows[0].fraction_of_bound == 2.0


def test_bad_settings():
    with pytest.raises(RuntimeInputError, match="--new-tokens"):
        bench.run_bench([], prompt=[1], new_tokens=1)
    with pytest.raises(RuntimeInputError, match="--runs"):
        bench.run_bench([], prompt=[1], new_tokens=4, runs=0)
    with pytest.raises(RuntimeInputError, match="--prompt-tokens"):
        bench.bench_prompt(100, 0)


def test_prompt_is_fixed_and_inside_the_vocabulary():
    p = bench.bench_prompt(500, 64)
    assert p == bench.bench_prompt(500, 64) and len(p) == 64 and all(100 <= t < 500 for t in p)


def test_bandwidth_is_plausible():
    bw = bench.measure_bandwidth(megabytes=16, repeats=2)
    assert 1e8 < bw < 1e13      # between 0.1 GB/s and 10 TB/s


def test_table_lists_every_runner():
    rows = [bench.Row("edgellama (portable, ortvalue)", "fp32", 540_000_000, 80.0, 50.0, 3, 60.0, 50 / 60),
            bench.Row("transformers eager", "fp32", 540_000_000, 120.0, 30.0, 3)]
    text = bench.format_table(rows, bandwidth=32e9)
    lines = text.splitlines()
    assert lines[0].split()[0] == "runner" and "edgellama (portable, ortvalue)" in lines[2]
    assert "83%" in lines[2] and lines[3].rstrip().endswith("-")
    assert "32.0 GB/s" in text


def test_precision_of_a_folder():
    assert Manifest(config={}, dtype="fp16", quantization=[]).precision == "fp16"
    assert Manifest(config={}, dtype="fp32", quantization=[{"mode": "int4", "block_size": 32}]).precision == "int4"
    assert Manifest(config={}, source={"spec": "smollm2", "name": "SmolLM2"}).source_spec == "smollm2"
    with pytest.raises(ModelFolderError):
        Manifest(config={}).source_spec


def test_our_runner_on_the_toy(tmp_path):
    folder = build_toy(tmp_path / "toy")
    runners = [bench.OursRunner(folder, provider="cpu", loop=loop) for loop in ("numpy", "ortvalue", "iobinding")]
    rows = bench.run_bench(runners, prompt=[3, 4, 5], new_tokens=6, runs=2, bandwidth=1e10)
    assert len({tuple(r.tokens) for r in rows}) == 1 and len(rows[0].tokens) == 6
    assert all(r.decode_tokens_per_s > 0 and r.weight_bytes > 0 and r.bound_tokens_per_s > 0 for r in rows)


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path):
    rows = [bench.Row("x", "fp32", 1, 1.0, 2.0, 1, 3.0, 0.5)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(EdgellamaError, match="needs matplotlib"):
            bench.plot(rows, tmp_path / "p.png")
        return
    out = bench.plot(rows, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
