"""check/bench.memory_profile: one runner alone in a child process, its resident memory phase by
phase (what bench/rss.py and bench/speed.py --rss report for issue 11's memory goal)."""

from __future__ import annotations

import pytest

from edgellama.check import bench
from edgellama.errors import RuntimeInputError
from tests.conftest import shared_export


@pytest.mark.parametrize("runner", bench.MEMORY_RUNNERS)
def test_each_phase_is_measured_in_order(tmp_path_factory, runner):
    if runner == "genai":
        pytest.importorskip("onnxruntime_genai")
    folder = shared_export(tmp_path_factory, "tiny", target="ort")     # genai runs our static folders too
    phases = bench.memory_profile(runner, folder, prompt=[5, 6, 7], new_tokens=4, threads=1)
    assert [name for name, _ in phases] == ["start", "imports", "loaded", "generated"]
    peaks = [m["hwm"] for _, m in phases]
    assert peaks == sorted(peaks) and all(0 < m["rss"] <= m["hwm"] for _, m in phases)
    assert all(abs(m["anon"] + m["file"] - m["rss"]) < 2 for _, m in phases)   # RssShmem aside
    before, after = phases[1][1], phases[2][1]
    assert after["rss"] > before["rss"]            # a loaded session holds memory of its own


def test_an_unknown_runner_is_refused(tmp_path):
    with pytest.raises(RuntimeInputError, match="unknown memory runner 'torch'"):
        bench.memory_profile("torch", tmp_path, prompt=[1], new_tokens=2)
