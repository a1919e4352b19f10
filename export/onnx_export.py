"""torch -> ONNX through the edgellama function ops, then lowering and the model folder.

`torch.onnx.export(dynamo=True)` translates each `edgellama::*` custom op into ONE node of the
`edgellama` domain (schemas in `schemas.py`); the standard-ONNX bodies (`functions.py`) are
attached afterwards, because the exporter's optimizer inlines any local function it is handed.
The result is the `portable` target; `ort` and `onnx23` are graph passes over it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from edgellama.errors import ExportError
from edgellama import folder as model_folder
from edgellama.contract import describe_io
from edgellama.export import schemas
from edgellama.export.model import Llama
from edgellama.progress import SILENT, Progress

TARGETS = ("portable", "ort", "onnx23")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("cpu", "cuda")
MIN_OPSET, MAX_OPSET = 18, 23

# Example sizes: all >= 2 and pairwise different, so torch.export cannot specialize a dynamic dim
# by coincidence (a batch-1 example, or past == sequence, silently becomes a constant).
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5


# -- translations: one custom-domain node per torch custom op ----------------------------------------
def _translations() -> dict[Any, Any]:
    import onnxscript

    schemas.register()
    ell = onnxscript.values.Opset(schemas.DOMAIN, schemas.VERSION)
    std = onnxscript.values.Opset("", MIN_OPSET)   # the exporter re-versions it to the model's opset

    def rms_norm(x, weight, eps: float):
        return ell.RMSNorm(x, weight, epsilon=eps)

    def rotary(x, position_ids, cos_cache, sin_cache, num_heads: int):
        return ell.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, num_heads=num_heads)

    def gqa(q, k, v, past_k, past_v, attention_mask, num_heads: int, kv_num_heads: int, scale: float,
            window: int = 0):
        # the window attribute only where there is one: a Llama graph is unchanged
        extra = {"sliding_window": window} if window > 0 else {}
        return ell.GroupQueryAttention(q, k, v, past_k, past_v, attention_mask,
                                       num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, **extra)

    def silu(x):
        # x / (1 + exp(-x)) rather than the exporter's x * Sigmoid(x): ONNX Runtime's CPU fuses
        # Sigmoid * Mul into QuickGelu on MLAS's logistic approximation, measurably less accurate
        # than torch's silu; Exp and Div are exact to fp32 rounding and fuse into nothing
        # (tests/export/lower/test_kernel_accuracy.py measures both). Saturates cleanly: exp(-x)
        # overflowing to inf gives x / inf = -0.
        return std.Div(x, std.Add(std.Exp(std.Neg(x)), std.CastLike(1.0, x)))

    ops = torch.ops.edgellama
    return {ops.rms_norm.default: rms_norm, ops.rotary.default: rotary, ops.gqa.default: gqa,
            torch.ops.aten.silu.default: silu}


class _Graph(torch.nn.Module):
    """The exported signature: flat past tensors in, logits (fp32) and flat present tensors out."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.model(input_ids, attention_mask, position_ids, past_key_values)
        # Logits leave in fp32 whatever the weights: sampling and parity want full precision.
        return logits.float(), present


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export_onnx(model: Llama, *, dtype: str = "fp32", opset: int = 23) -> Any:
    """The portable ONNX model (an `onnx_ir.Model`) of an in-memory `model`, function bodies attached.

    Weights are not copied: each initializer reads its torch tensor when it is written."""
    import itertools

    from edgellama.export.sources import in_memory

    own = {name: t for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if name not in _BUFFERS}
    return export_weights(in_memory(model.config, own), dtype=dtype, opset=opset)


def export_weights(weights: Any, *, dtype: str = "fp32", opset: int = 23) -> Any:
    """The portable ONNX model of a source's `Weights` (export/sources.py), traced without them.

    The torch model is built on the meta device and traced; every initializer is then a LazyTensor
    that reads its weight from the source in the target dtype when it is written (folder.save_model),
    so no step holds the model's weights: a folded Transpose is a LazyTensor too (`_fold_lazily`).
    """
    import onnx_ir as ir

    from edgellama.export.functions import function_protos

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    cfg = weights.config
    with torch.device("meta"):
        model = Llama(cfg).to(DTYPES[dtype]).eval()
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    kv = (b, cfg.num_key_value_heads, p, cfg.head_dim)
    past = [(torch.zeros(kv, dtype=DTYPES[dtype]), torch.zeros(kv, dtype=DTYPES[dtype]))
            for _ in range(cfg.num_hidden_layers)]

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_seq, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq},
               "past_key_values": [({0: batch, 2: past_seq}, {0: batch, 2: past_seq}) for _ in past]}
    inputs, outputs = io_names(cfg.num_hidden_layers)
    import contextlib
    import io

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The exporter's step banners and axis-renaming warnings are not actionable for our users;
        # our own progress lines say what is happening.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Graph(model), (ids, mask, pos, past), dynamo=True, dynamic_shapes=dynamic,
            input_names=inputs, output_names=outputs, opset_version=opset,
            custom_translation_table=_translations(), optimize=False, verbose=False,
        )
    ir_model = program.model
    names = _state_dict_names(model)
    _attach_weights(ir_model.graph, weights, names=names, dtype=DTYPES[dtype])
    # Optimized here rather than by the exporter: which folded constant came from which weight is
    # only visible before constant folding.
    folded = _folded_sources(ir_model.graph)
    _optimize(ir_model)
    _name_initializers(ir_model.graph, names=names, folded=folded)
    _computed_constants_last(ir_model.graph, names=names, folded=folded)
    _name_nodes(ir_model)
    for proto in function_protos(opset):
        fn = ir.serde.deserialize_function(proto)
        ir_model.functions[fn.identifier()] = fn
    ir_model.opset_imports[schemas.DOMAIN] = schemas.VERSION
    ir_model.producer_name, ir_model.producer_version = "edgellama", _version()
    _name_dims(ir_model)
    check_dynamic(ir_model)
    return ir_model


# The traced model's buffers: derived from the config here, never read from a source.
_BUFFERS = ("rope_cos", "rope_sin")


def _attach_weights(graph: Any, weights: Any, *, names: dict[str, str], dtype: Any) -> None:
    """Give every initializer of the meta-traced graph a LazyTensor reading its weight (or rope
    table) in `dtype` when asked."""
    import onnx_ir as ir

    from edgellama.export.model import rope_cache

    tables: dict[str, Any] = {}

    def rope(name: str, want: Any) -> Any:
        if not tables:
            tables.update(zip(_BUFFERS, rope_cache(weights.config)))
        return tables[name].to(want)

    for value in graph.initializers.values():
        name = names.get(value.name)
        if name is None:
            continue
        read = rope if name in _BUFFERS else weights.read
        if name not in _BUFFERS and name not in weights.shapes:
            raise ExportError(f"the traced model has a weight {name} the source does not give")
        meta = value.const_value
        value.const_value = ir.LazyTensor(_reader(read, name, dtype), dtype=meta.dtype, shape=meta.shape,
                                          name=meta.name)


def _reader(read: Callable[[str, Any], Any], name: str, dtype: Any) -> Callable[[], Any]:
    import onnx_ir as ir

    return lambda: ir.tensor(read(name, dtype).numpy(), name=name)


def _optimize(ir_model: Any) -> None:
    """What the exporter's `ONNXProgram.optimize` runs (onnxscript's optimizer, then its fusions),
    with one change: a Transpose of a large weight is folded by `_fold_lazily`."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(ir_model, should_fold=_fold_lazily)
    onnxscript.rewriter.onnx_fusions.fuse(ir_model)


# onnxscript's constant folding: inputs above this many elements are not folded, except a
# Transpose that is its input's only reader (the weight as MatMul reads it).
_FOLD_INPUT_LIMIT = 8192
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def _fold_lazily(node: Any) -> bool | None:
    """onnxscript's `should_fold` hook: the fold the optimizer would make of a Transpose of a large
    lazy weight, made here instead as a LazyTensor that transposes on demand (the optimizer would
    compute it, holding every transposed weight in memory at once). Registered at the same point
    of the same sweep as the optimizer's own folds, so the initializers keep the order (and
    model.onnx.data the layout) the optimizer gives them. False: the optimizer leaves the node,
    now unused; None: its own rules decide."""
    import numpy as np
    import onnx_ir as ir

    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
        return None
    source = node.inputs[0]
    tensor = source.const_value if source is not None else None
    if not source.is_initializer() or not isinstance(tensor, ir.LazyTensor):
        return None
    if tensor.size <= _FOLD_INPUT_LIMIT or len(source.uses()) != 1 or source.is_graph_output():
        return None
    attr = node.attributes.get("perm")
    perm = list(attr.as_ints()) if attr is not None else list(range(len(tensor.shape)))[::-1]
    out = node.outputs[0]
    shape = ir.Shape([tensor.shape[i] for i in perm])
    lazy = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(np.transpose(tensor.numpy(), perm)), name=out.name),
                         dtype=tensor.dtype, shape=shape, name=out.name)
    folded = ir.Value(name=out.name, type=ir.TensorType(tensor.dtype), shape=shape, const_value=lazy)
    origin = set(source.meta.get(_FOLDED_FROM, set())) | {source.name}
    folded.meta[_FOLDED_FROM] = origin
    folded.metadata_props[_FOLDED_FROM] = repr(sorted(origin))
    graph = node.graph
    graph.register_initializer(folded)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [], node.outputs, [folded])
    if not source.uses() and not source.is_graph_output():
        graph.initializers.pop(source.name)
    return False


def _name_nodes(ir_model: Any) -> None:
    """Name each node after the torch module that produced it, e.g.
    `model.layers.3.self_attn/GroupQueryAttention`, then drop the exporter's per-node metadata.

    Parity localization finds blocks by these names and a viewer shows them; the dropped metadata
    (stack traces) was most of the file for small models.
    """
    import ast
    import collections

    seen: collections.Counter = collections.Counter()
    for node in ir_model.graph:
        try:
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        paths = [p.removeprefix(_WRAPPER) for p in scopes if isinstance(p, str) and p.startswith(_WRAPPER)]
        base = f"{paths[-1]}/{node.op_type}" if paths else node.op_type
        node.name = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
        node.metadata_props.clear()


# The wrapper module adds one leading "model." to every torch module path.
_WRAPPER = "model."


def _state_dict_names(model: Llama) -> dict[str, str]:
    """Exporter's initializer name -> the weight's name in `model`'s state_dict.

    The exporter names a weight by one of its paths through the wrapper, whichever it met first;
    a tied weight (lm_head = embed_tokens) keeps the one name `named_parameters` gives it.
    """
    import itertools

    own = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    canonical = {id(t): name for name, t in own.items()}
    every = itertools.chain(model.named_parameters(remove_duplicate=False),
                            model.named_buffers(remove_duplicate=False))
    return {_WRAPPER + name: canonical[id(t)] for name, t in every}


# Ops whose result on a weight is folded into a new, anonymous initializer: the weight as
# MatMul reads it (Linear's transposed weight) and the weight in the model's dtype.
_FOLDED_OPS = ("Transpose", "Cast")


def _folded_sources(graph: Any) -> dict[str, str]:
    """Before constant folding: output name -> the weight it derives from, for every one-input
    Transpose or Cast of an initializer (the folded constant keeps that output name)."""
    found = {}
    for node in graph:
        if node.op_type in _FOLDED_OPS and node.domain in ("", "ai.onnx") and len(node.inputs) == 1:
            source = node.inputs[0]
            if source is not None and source.is_initializer():
                found[node.outputs[0].name] = source.name
    return found


def _name_initializers(graph: Any, *, names: dict[str, str], folded: dict[str, str]) -> None:
    """Rename every initializer that holds a torch weight (as is, transposed or cast) to the
    weight's state_dict name, `model.layers.1.mlp.down_proj.weight`, as optimum and
    onnxruntime-genai name them: a viewer, `--exclude` reports and debugging read module paths.

    Direct weights are renamed before derived ones, so where both survive (a tied embedding read
    by Gather and, through a Transpose, by lm_head) the weight itself keeps the name.
    """
    taken = {v.name for v in graph.inputs} | {v.name for node in graph for v in node.outputs}
    inits = list(graph.initializers.values())
    direct = [(v, names.get(v.name)) for v in inits if v.name in names]
    derived = [(v, names.get(folded[v.name])) for v in inits if v.name in folded]
    for value, name in direct + derived:
        if name and name != value.name and name not in graph.initializers and name not in taken:
            value.name = name


def _computed_constants_last(graph: Any, *, names: dict[str, str], folded: dict[str, str]) -> None:
    """Initializers the trace made up (the SiLU's 1.0) after those that hold the source's weights,
    so model.onnx.data starts with the weights in the order the optimizer gives them."""
    weights = set(names.values()) | set(_BUFFERS) | set(folded)
    for value in [v for v in graph.initializers.values() if v.name not in weights]:
        graph.initializers.pop(value.name)
        graph.register_initializer(value)


def _name_dims(ir_model: Any) -> None:
    """Give present tensors the readable dim name `total_sequence` (the exporter writes an expression)."""
    import onnx_ir as ir

    for v in ir_model.graph.outputs:
        if v.name.startswith("present.") and v.shape is not None:
            dims = list(v.shape)
            dims[2] = ir.SymbolicDim("total_sequence")
            v.shape = ir.Shape(dims)


def check_dynamic(ir_model: Any) -> None:
    """Batch, sequence and past/total sequence dims must stay symbolic after export."""
    want = {"input_ids": (0, 1), "attention_mask": (0, 1), "position_ids": (0, 1), "logits": (0, 1)}
    for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs):
        axes = want.get(v.name, (0, 2) if v.name.startswith(("past_key_values.", "present.")) else ())
        for axis in axes:
            dim = v.shape[axis] if v.shape is not None else None
            if dim is None or isinstance(dim, int):
                raise ExportError(f"export specialized dim {axis} of {v.name} to {dim!r}; it must stay dynamic")


def lower(ir_model: Any, *, target: str, provider: str = "cpu", kv_cache: str = "dynamic") -> Any:
    """Apply the lowering pass of `target` to a portable model (onnx_ir in, onnx_ir out)."""
    from edgellama.export.lower import lower as lower_to

    return lower_to(ir_model, target=target, provider=provider, kv_cache=kv_cache)


def _version() -> str:
    import edgellama

    return edgellama.__version__


def export_model(source: str, out: Path | str, *, target: str = "portable", dtype: str = "fp32",
                 opset: int = 23, provider: str = "cpu", force: bool = False,
                 progress: Progress = SILENT, kv_cache: str | None = None,
                 finish: Callable[[Any, model_folder.Manifest], model_folder.Manifest] | None = None) -> Path:
    """Export `source` (HF folder, .gguf, `smollm2`, `tiny`) to a complete model folder at `out`.

    Checks every argument before loading anything; writes atomically (see folder.py). `finish`
    gets the in-memory onnx_ir model and its manifest before anything is written, may edit the
    model in place and returns the manifest to write (`export --quant` quantizes there, so one
    folder is written). `kv_cache` is the graph contract: "static" (one shared cache buffer per
    layer, export/lower/ort_static.py; the default for `ort` where ONNX Runtime has the kernel) or
    "dynamic" (past in, present = past ++ new out; the only one for portable and onnx23).
    """
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if provider not in PROVIDERS:
        raise ExportError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if target == "onnx23" and opset != 23:
        raise ExportError(f"--target onnx23 needs --opset 23 (got {opset})")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    from edgellama.export.lower.targets import KV_CACHES, default_kv_cache

    asked = kv_cache
    kv_cache = kv_cache or default_kv_cache(target, dtype=dtype, provider=provider)
    if kv_cache not in KV_CACHES:
        raise ExportError(f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    if kv_cache == "static" and target != "ort":
        raise ExportError(f"--kv-cache static needs --target ort; {target} keeps the dynamic contract")
    out = Path(out)
    from edgellama.export.sources import check_source, hf_config_files, open_source

    # A source path is an input OUT must not overlap: --force would delete the user's checkpoint.
    src_path = check_source(source)
    inputs = (src_path,) if src_path is not None else ()
    model_folder.check_output(out, force=force, inputs=inputs)

    with progress.step("load source"):
        weights, tokenizer, info = open_source(source)
    config = weights.config
    if tokenizer is None:
        # Token ids still work (generate --prompt-ids); a text prompt will be refused by the folder.
        warnings.warn(f"{source} has no tokenizer (tokenizer.json): the exported folder takes token ids, not text",
                      NoTokenizerWarning, stacklevel=2)
    from edgellama.export.lower.targets import static_refusal

    # A family the static graph cannot carry: the default falls back to the dynamic contract; an
    # explicit --kv-cache static is refused.
    if kv_cache == "static" and (reason := static_refusal(config)) is not None:
        if asked == "static":
            raise ExportError(f"--kv-cache static refused: {reason} (--kv-cache dynamic works)")
        kv_cache = "dynamic"
    with progress.step("export to ONNX (portable)"):
        ir_model = export_weights(weights, dtype=dtype, opset=opset)
    if target != "portable":
        with progress.step(f"lower to {target}"):
            ir_model = lower(ir_model, target=target, provider=provider, kv_cache=kv_cache)
    manifest = model_folder.Manifest(
        source=info, config=config.to_dict(), target=target, dtype=dtype, provider=provider,
        opset=opset, io=describe_io(ir_model), packages=model_folder.package_versions(), kv_cache=kv_cache)
    if finish is not None:
        manifest = finish(ir_model, manifest)
    # Weights are read from the source while model.onnx.data is written: the source errors (a shard
    # truncated or changed since its header was checked) surface here, inside the staged folder.
    with model_folder.staged_folder(out, force=force, inputs=inputs) as tmp, progress.step("write model folder"):
        data = model_folder.save_model(ir_model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in hf_config_files(config, folder=src_path).items():
            (tmp / name).write_text(text, encoding="utf-8")
        model_folder.write_genai_config(tmp, config, inputs=[i["name"] for i in manifest.io["inputs"]],
                                        share_buffer=kv_cache == "static")
        model_folder.write_manifest(tmp, manifest, known={model_folder.DATA: data})
    return out


class NoTokenizerWarning(UserWarning):
    """An exported source had no tokenizer: its folder takes token ids, not text."""
