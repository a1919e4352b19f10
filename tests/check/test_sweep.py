"""`edgellama sweep` end to end: a small plan locally and on a local Ray, resume, failing cells, bad plans.

One plan serves the module: tiny x (portable, ort) x (fp32, int8) on cpu, plus a source folder
that exists but cannot be exported (its config names a GPT-2), so every run has cells that pass
and cells that fail. It runs once locally and once on Ray (ray.init in this process, 2 CPUs).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from edgellama.check import sweep
from edgellama.check.sweep_plan import load_plan
from edgellama.cli.main import main

TARGETS, PRECISIONS = ["portable", "ort"], ["fp32", "int8"]
SMALL = {"parity": {"decode_steps": 2}, "quality": {"tokens": 64, "window": 32}}


def _write_plan(folder: Path, name: str = "plan.json", **fields) -> Path:
    plan = {"sources": ["tiny"], "targets": TARGETS, "precisions": PRECISIONS, "providers": ["cpu"], **SMALL}
    plan.update(fields)
    path = folder / name
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def _sweep(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["sweep", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep-plan")
    broken = root / "gpt2"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return _write_plan(root, sources=["tiny", "gpt2"])   # relative: read from the plan's folder


@pytest.fixture(scope="module")
def local(plan, tmp_path_factory) -> dict:
    """The plan run in this process. Its four tiny exports open and trace tiny as the session's
    shared exports do (tests/conftest.py shared_trace: ~3 CPU s a trace, four times); what this
    module checks is the sweep around the exports, and the Ray run traces afresh in its workers."""
    from tests.conftest import shared_trace

    out = tmp_path_factory.mktemp("sweep-local") / "out"
    with shared_trace("tiny"):
        rc, stdout, stderr = _sweep(plan, "-o", out, "--json", "--quiet")
    return {"rc": rc, "out": out, "json": json.loads(stdout), "stderr": stderr}


@pytest.fixture(scope="module")
def on_ray(plan, tmp_path_factory) -> dict:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path_factory.mktemp("sweep-ray") / "out"
        rc, stdout, _ = _sweep(plan, "-o", out, "--json", "--quiet", "--ray", "local")
    finally:
        ray.shutdown()
    return {"rc": rc, "out": out, "json": json.loads(stdout)}


def _cells(result: dict) -> dict[str, dict]:
    return {r["cell"]: r for r in result["cells"]}


# -- a local sweep --------------------------------------------------------------------------------------
def test_every_cell_has_a_record_and_the_failures_do_not_stop_the_others(local):
    result = local["json"]
    assert result["schema"] == "edgellama.sweep" and result["version"] == 1
    cells = _cells(result)
    want = {f"{s}-{t}-{p}-cpu" for s in ("tiny", "gpt2") for t in TARGETS for p in PRECISIONS}
    assert set(cells) == want
    for cid, r in cells.items():
        stored = json.loads((local["out"] / "cells" / f"{cid}.json").read_text())
        assert stored == {k: v for k, v in r.items() if k != "resumed"}
        if cid.startswith("tiny-"):
            assert r["status"] == "ok" and r["error"] is None, r["error"]
            assert r["parity"]["status"] == "pass" and r["quality"]["tokens"] == 64
            assert set(r["seconds"]) >= {"export", "parity", "quality", "total"}
            assert r["versions"]["onnxruntime-gpu" if "onnxruntime-gpu" in r["versions"] else "onnxruntime"]
        else:
            assert r["status"] == "failed" and r["stage"] == "export"
            assert "GPT2LMHeadModel" in r["error"] or "gpt2" in r["error"]
    assert result["summary"] == {"cells": 8, "ok": 4, "failed": 4, "ran": 8, "resumed": 0}
    assert local["rc"] == 1   # a failed cell is a failed check
    assert local["stderr"].strip().splitlines()[-1].startswith("edgellama: check failed: 4 of 8 cells failed")
    assert json.loads((local["out"] / "results.json").read_text()) == result


def test_figures_are_measured(local):
    cells = _cells(local["json"])
    for target in TARGETS:
        fp32, int8 = cells[f"tiny-{target}-fp32-cpu"], cells[f"tiny-{target}-int8-cpu"]
        assert fp32["parity"]["kl_mean"] < 1e-9 < int8["parity"]["kl_mean"]
        assert fp32["quality"]["kl_mean"] < 1e-9 < int8["quality"]["kl_mean"]
        assert fp32["quality"]["ppl"] == pytest.approx(fp32["quality"]["reference_ppl"], rel=1e-5)
        assert int8["model_bytes"] < fp32["model_bytes"] / 2
        assert "quantize" in int8["seconds"] and "quantize" not in fp32["seconds"]


def test_markdown_table_has_a_row_per_cell(local, tmp_path, plan):
    table = (local["out"] / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-") or line.startswith("| gpt2-")]
    assert len(rows) == 8
    assert all("**FAILED**" in r and "export:" in r for r in rows if r.startswith("| gpt2-"))
    assert all("| ok |" in r for r in rows if r.startswith("| tiny-"))
    assert table.startswith("### edgellama sweep: 4 of 8 cells ok, 4 failed")


def test_rerun_skips_the_cells_done_and_runs_the_failed_again(local, plan, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local["out"], out)
    before = {p.name: p.read_bytes() for p in (out / "cells").iterdir() if p.name.startswith("tiny-")}
    summary = tmp_path / "summary.md"
    rc, stdout, _ = _sweep(plan, "-o", out, "--json", "--quiet", "--markdown", summary)
    result = json.loads(stdout)
    assert rc == 1
    assert result["summary"] == {"cells": 8, "ok": 4, "failed": 4, "ran": 4, "resumed": 4}
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir() if p.name.startswith("tiny-")} == before
    assert all(r["resumed"] == r["cell"].startswith("tiny-") for r in result["cells"])
    assert "(local, 4 run, 4 resumed)" in summary.read_text()


def test_a_stored_result_counts_only_for_the_same_cell_settings(local, plan, tmp_path):
    cell = load_plan(plan).cells()[0]
    record = json.loads((local["out"] / "cells" / f"{cell.id}.json").read_text())
    assert sweep.is_done(record, cell)
    changed = load_plan(_write_plan(tmp_path, sources=["tiny"], parity={"decode_steps": 3})).cells()[0]
    assert changed.id == cell.id and not sweep.is_done(record, changed)
    assert not sweep.is_done({**record, "status": "failed"}, cell)


def test_cuda_cell_fails_alone_where_cuda_cannot_start(tmp_path):
    from edgellama.runtime.session import cuda_status

    available, reason = cuda_status()
    if available:
        pytest.skip("CUDA works here: the cuda cell would pass (tests/cuda runs it)")
    plan = _write_plan(tmp_path, targets=["ort"], precisions=["fp32"], providers=["cuda"])
    rc, stdout, _ = _sweep(plan, "-o", tmp_path / "out", "--json", "--quiet")
    (r,) = json.loads(stdout)["cells"]
    assert rc == 1 and r["status"] == "failed" and r["stage"] == "provider"
    assert r["error"].startswith("CUDA is not available")
    assert r["seconds"]["total"] < 60 and "export" not in r["seconds"]   # refused before the export


# -- on Ray -----------------------------------------------------------------------------------------------
def test_the_same_plan_on_ray_gives_the_same_results(local, on_ray):
    assert on_ray["rc"] == local["rc"] == 1
    assert on_ray["json"]["executor"] == "ray" and on_ray["json"]["summary"] == local["json"]["summary"]
    here, there = _cells(local["json"]), _cells(on_ray["json"])
    assert set(here) == set(there)
    for cid, a in here.items():
        b = there[cid]
        assert (b["status"], b["stage"], b["error"], b["model_bytes"]) == (a["status"], a["stage"], a["error"],
                                                                           a["model_bytes"])
        if a["status"] == "ok":
            for part in ("parity", "quality"):
                for key in ("kl_mean", "top1"):
                    assert b[part][key] == pytest.approx(a[part][key], rel=1e-6, abs=1e-12), (cid, part, key)
            assert b["versions"]["ray"]


# -- bad input ----------------------------------------------------------------------------------------------
BAD_PLANS = [
    ({"sources": ["tiny", "no/such/model"]}, "no such model source"),
    ({"targets": ["portable", "tensorrt"]}, "unknown target 'tensorrt'"),
    ({"precisions": ["int3"]}, "unknown precision 'int3'"),
    ({"providers": ["rocm"]}, "unknown provider 'rocm'"),
    ({"target": ["ort"]}, "unknown key 'target'"),
    ({"sources": []}, "`sources` must be a non-empty list"),
    ({"parity": {"decode_steps": -1}}, "`parity.decode_steps` must be an integer >= 0"),
    ({"quality": {"text": "missing.txt"}}, "cannot read the quality text"),
    ({"quality": {"tokenz": 5}}, "unknown quality setting 'tokenz'"),
    ({"sources": ["tiny", {"name": "tiny", "source": "."}]}, "two sources are both named 'tiny'"),
]


@pytest.mark.parametrize("fields,words", BAD_PLANS, ids=[w for _, w in BAD_PLANS])
def test_bad_plan_is_one_line_exit_2_before_anything_runs(tmp_path, fields, words):
    plan = _write_plan(tmp_path, **fields)
    rc, stdout, stderr = _sweep(plan, "-o", tmp_path / "out")
    lines = stderr.strip().splitlines()
    assert rc == 2 and stdout == "" and len(lines) == 1, stderr
    assert lines[0].startswith("edgellama: error: ") and words in lines[0]
    assert not (tmp_path / "out").exists()


def test_unreadable_plans(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.toml").write_text("sources = [")
    for name, words in (("bad.json", "is not valid JSON"), ("bad.toml", "is not valid TOML"),
                        ("none.json", "cannot read the plan")):
        rc, _, stderr = _sweep(tmp_path / name, "-o", tmp_path / "out")
        assert rc == 2 and words in stderr and len(stderr.strip().splitlines()) == 1


def test_toml_plan_reads_as_its_json_twin(tmp_path):
    pytest.importorskip("tomllib")
    toml = tmp_path / "plan.toml"
    toml.write_text('sources = ["tiny"]\ntargets = ["portable", "ort"]\nprecisions = ["fp32", "int8"]\n'
                    'providers = ["cpu"]\n[parity]\ndecode_steps = 2\n[quality]\ntokens = 64\nwindow = 32\n')
    a, b = load_plan(toml).to_dict(), load_plan(_write_plan(tmp_path)).to_dict()
    assert {**a, "path": None} == {**b, "path": None}


def test_output_that_is_not_a_sweep_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, _, stderr = _sweep(_write_plan(tmp_path), "-o", out)
    assert rc == 2 and "holds no sweep" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
