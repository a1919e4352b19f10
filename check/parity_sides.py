"""The two sides of a parity check behind one interface, with per-block probes for localization.

A side runs one decoder step on numpy arrays:
    forward(input_ids, attention_mask, position_ids, past) -> (logits [B,S,V] f32, present, probes)
where `past`/`present` is a list of (key, value) arrays [B, H_kv, T, D] per layer and `probes` maps
a probe key (see PROBES) to that block's output [B, S, F] when the side was opened with probes.

`TorchSide` runs the fp32 torch blocks (export/model.py); `OrtSide` an exported folder through
`runtime/session.py`'s OrtModel, its probes through a second session on the graph edited in memory
to output the block values (`with_outputs`). Torch is imported only by the torch side.

A folder with the static KV cache contract (export/lower/ort_static.py) runs through its own loop
(runtime/static_loop.py's StaticCache, one per batch), on its graph edited in memory to return
every position's logits; its right-padded rows, logits, probes and cache are laid out as the
dynamic contract's left-padded ones, so the comparison is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgellama import contract
from edgellama.errors import RuntimeInputError

# Per-layer blocks in execution order: (key, op kind shown to users, torch module path under the layer).
LAYER_PROBES = (
    ("input_layernorm", "RMSNorm", "input_layernorm"),
    ("q_rotary", "RotaryEmbedding", "self_attn"),
    ("k_rotary", "RotaryEmbedding", "self_attn"),
    ("attention", "GroupQueryAttention", "self_attn"),
    ("o_proj", "MatMul", "self_attn.o_proj"),
    ("post_attention_layernorm", "RMSNorm", "post_attention_layernorm"),
    ("mlp", "MatMul", "mlp.down_proj"),
)
FINAL_PROBES = (("norm", "RMSNorm", "norm"),)


def probe_keys(n_layers: int) -> list[tuple[str, int | None, str, str]]:
    """Every probe in execution order as (key, layer or None, block, op kind)."""
    out = [(f"layers.{i}.{block}", i, block, op) for i in range(n_layers) for block, op, _ in LAYER_PROBES]
    return out + [(block, None, block, op) for block, op, _ in FINAL_PROBES]


# -- torch ---------------------------------------------------------------------------------------
class TorchSide:
    """The fp32 torch blocks; probes come from forward hooks plus the reference ops of export/ops.py."""

    kind = "torch"

    def __init__(self, model: Any, *, label: str = "torch"):
        import torch

        self.torch = torch
        self.model = model.float().eval()
        self.config = model.config
        self.label = label
        self.probe_names = {k: self._module_path(k) for k, *_ in probe_keys(self.config.num_hidden_layers)}

    @staticmethod
    def _module_path(key: str) -> str:
        if key.startswith("layers."):
            _, i, block = key.split(".", 2)
            path = dict((b, p) for b, _, p in LAYER_PROBES)[block]
            return f"model.layers.{i}.{path}"
        return f"model.{key}"

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.config
        return contract.pairs(contract.empty_past(batch=batch, n_layers=c.num_hidden_layers,
                                                  kv_heads=c.num_key_value_heads, head_dim=c.head_dim))

    def forward(self, input_ids, attention_mask, position_ids, past, *, probes: bool = False):
        torch = self.torch
        t = torch.from_numpy
        captured: dict[str, np.ndarray] = {}
        handles = self._hooks(captured) if probes else []
        try:
            with torch.no_grad():
                logits, present = self.model(
                    t(np.ascontiguousarray(input_ids)), t(np.ascontiguousarray(attention_mask)),
                    t(np.ascontiguousarray(position_ids)),
                    [(t(np.ascontiguousarray(k, dtype=np.float32)), t(np.ascontiguousarray(v, dtype=np.float32)))
                     for k, v in past])
        finally:
            for h in handles:
                h.remove()
        return (logits.float().numpy(), [(k.numpy(), v.numpy()) for k, v in present], captured)

    def _hooks(self, captured: dict[str, np.ndarray]) -> list[Any]:
        from edgellama.export import ops

        def keep(key):
            def hook(module, args, output):
                captured[key] = (output[0] if isinstance(output, tuple) else output).detach().float().numpy()
            return hook

        def attention(i):
            # RoPE and GQA are custom-op calls inside Attention.forward, not modules: recompute them
            # from the hooked inputs with the reference functions the custom ops run (same numbers).
            def hook(module, args, output):
                x, pos, cos, sin, past_k, past_v, mask = args
                q, k, v = module.rotated_qkv(x, pos, cos, sin)
                out = ops.gqa_ref(q, k, v, past_k, past_v, mask, module.n_heads,
                                  module.n_kv_heads, module.scale, module.window)[0]
                captured[f"layers.{i}.q_rotary"] = q.float().numpy()
                captured[f"layers.{i}.k_rotary"] = k.float().numpy()
                captured[f"layers.{i}.attention"] = out.float().numpy()
            return hook

        handles = []
        for i, layer in enumerate(self.model.model.layers):
            handles.append(layer.input_layernorm.register_forward_hook(keep(f"layers.{i}.input_layernorm")))
            handles.append(layer.self_attn.register_forward_hook(attention(i)))
            handles.append(layer.self_attn.o_proj.register_forward_hook(keep(f"layers.{i}.o_proj")))
            handles.append(layer.post_attention_layernorm.register_forward_hook(
                keep(f"layers.{i}.post_attention_layernorm")))
            handles.append(layer.mlp.register_forward_hook(keep(f"layers.{i}.mlp")))
        handles.append(self.model.model.norm.register_forward_hook(keep("norm")))
        return handles


# -- ONNX Runtime ------------------------------------------------------------------------------------
_NORM_OPS = {"RMSNorm", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
             "LayerNormalization", "SkipLayerNormalization"}
_ROPE_OPS = {"RotaryEmbedding"}
_ATTN_OPS = {"GroupQueryAttention", "Attention", "MultiHeadAttention"}


def _module_of(node_name: str) -> str:
    """`model.layers.3.self_attn/RotaryEmbedding_1` -> `model.layers.3.self_attn`."""
    return node_name.split("/", 1)[0] if "/" in node_name else ""


def find_probe_values(graph: Any, n_layers: int) -> dict[str, tuple[str, str]]:
    """Probe key -> (value name, node name) in an exported graph (onnx GraphProto).

    Nodes are found by the torch module path the exporter names them after (layer index + block)
    and by op kind, not by exact name, so lowered (`ort`, `onnx23`) and quantized graphs, whose
    passes replace ops but keep the module path, still map. RoPE q/k are told apart by which input
    of the layer's attention node they feed (query is input 0, key input 1), falling back to order.
    A probe without a match is left out (e.g. RoPE fused into ORT's GroupQueryAttention).
    """
    by_module: dict[str, list[Any]] = {}
    for node in graph.node:
        by_module.setdefault(_module_of(node.name), []).append(node)
    out: dict[str, tuple[str, str]] = {}

    def last(module: str, ops: set[str] | None = None):
        nodes = [n for n in by_module.get(module, []) if ops is None or n.op_type in ops]
        return nodes[-1] if nodes else None

    def put(key, node, index=0):
        if node is not None and len(node.output) > index and node.output[index]:
            out[key] = (node.output[index], node.name)

    for i in range(n_layers):
        base = f"model.layers.{i}"
        put(f"layers.{i}.input_layernorm", last(f"{base}.input_layernorm", _NORM_OPS))
        attn = last(f"{base}.self_attn", _ATTN_OPS)
        ropes = [n for n in by_module.get(f"{base}.self_attn", []) if n.op_type in _ROPE_OPS]
        q = k = None
        if attn is not None:
            q = next((n for n in ropes if attn.input and n.output[0] == attn.input[0]), None)
            k = next((n for n in ropes if len(attn.input) > 1 and n.output[0] == attn.input[1]), None)
        if (q is None or k is None) and len(ropes) == 2:
            q, k = ropes
        put(f"layers.{i}.q_rotary", q)
        put(f"layers.{i}.k_rotary", k)
        put(f"layers.{i}.attention", attn)
        put(f"layers.{i}.o_proj", last(f"{base}.self_attn.o_proj"))
        put(f"layers.{i}.post_attention_layernorm", last(f"{base}.post_attention_layernorm", _NORM_OPS))
        put(f"layers.{i}.mlp", last(f"{base}.mlp.down_proj"))
    put("norm", last("model.norm", _NORM_OPS))
    return out


def with_outputs(folder: Path, names: list[str], *, proto: Any = None, **session: Any) -> Any:
    """The folder on an OrtModel whose graph also outputs the values `names` (node outputs or inputs
    of the main graph). The graph is edited in memory; nothing is written into the folder.
    `session` goes to OrtModel (provider, threads, verify, ...)."""
    import onnx

    from edgellama import folder as model_folder
    from edgellama.runtime.session import OrtModel

    proto = proto if proto is not None else model_folder.load_model_proto(folder, with_weights=False)
    names = list(dict.fromkeys(names))
    known = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    missing = [n for n in names if n not in known]
    if missing:
        raise RuntimeInputError(f"{folder}: no value named {', '.join(map(repr, missing))} in the main graph")
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return OrtModel(folder, proto=proto, **session)


def full_logits(proto: Any) -> Any:
    """A static-contract graph (ModelProto, edited in place) whose LM head reads every position's
    hidden state instead of each row's last one: logits [B, S, V]."""
    from edgellama.export.lower.ort_static import LAST_HIDDEN

    producers = {o: n for n in proto.graph.node for o in n.output}
    if LAST_HIDDEN not in producers:
        return proto
    # LAST_HIDDEN = Reshape(Gather(Reshape(hidden)))
    hidden = producers[producers[producers[LAST_HIDDEN].input[0]].input[0]].input[0]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == LAST_HIDDEN:
                node.input[i] = hidden
    for out in proto.graph.output:
        if out.name == contract.LOGITS:
            out.type.tensor_type.shape.dim[1].dim_param = "sequence"
    # Recorded shapes of values after the head (e.g. fp16 logits before their Cast) still say one
    # position: ONNX Runtime infers them again.
    del proto.graph.value_info[:]
    return proto


class _StaticRun:
    """The static contract behind the dynamic one's forward: left-padded rows in, left-padded
    logits, probes and cache out."""

    def __init__(self, model: Any, probe_values: list[str]):
        self.model, self.probe_values, self.cache = model, probe_values, None

    def forward(self, input_ids, attention_mask, past):
        from edgellama.runtime.static_loop import StaticCache, real_tokens

        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        b, s, t = ids.shape[0], ids.shape[1], mask.shape[1]
        if self.cache is None or not past or past[0].shape[2] == 0:   # a first call: a new request
            self.cache = StaticCache(self.model, b, t + 64, extra_outputs=self.probe_values)
        rows = real_tokens(ids, mask[:, -s:])
        self.cache.append(rows)
        outs = self.cache.outputs()

        def left(x):   # right-padded [B, S, F] -> left-padded
            y = np.zeros_like(x)
            for r, row in enumerate(rows):
                y[r, s - len(row):] = x[r, :len(row)]
            return y

        logits, extra = left(outs[0]), [left(x) if x.ndim == 3 and x.shape[1] == s else x for x in outs[1:]]
        present = []
        for buf in self.cache.key_values():
            p = np.zeros((b, buf.shape[1], t, buf.shape[3]), buf.dtype)
            for r, n in enumerate(self.cache.lengths):
                p[r, :, t - n:] = buf[r, :, :n]
            present.append(p)
        return logits, present, dict(zip(self.probe_values, extra))


class OrtSide:
    """An exported model folder on one ONNX Runtime provider (runtime/session.py's OrtModel)."""

    kind = "onnxruntime"

    def __init__(self, folder: Path, *, provider: str = "cpu", threads: int | None = None,
                 label: str | None = None, verify: bool = True):
        from edgellama.runtime.session import OrtModel

        self.folder = Path(folder)
        self.provider = provider
        self.threads = threads
        self.label = label or f"{self.folder.name} ({provider})"
        # run_parity verified the folder's hashes once already; the probe session reuses that.
        self.model = OrtModel(self.folder, provider=provider, threads=threads, verify=verify)
        self.static = self.model.kv_cache == "static"
        if self.static:
            from edgellama import folder as model_folder

            proto = full_logits(model_folder.load_model_proto(self.folder, with_weights=False))
            self.model = OrtModel(self.folder, provider=provider, threads=threads, verify=False, proto=proto)
            self._static = _StaticRun(self.model, [])
        self.manifest = self.model.manifest
        self.config = self.model.config
        self._probe_model = None
        self.probe_names: dict[str, str] = {}
        self._probe_values: dict[str, str] = {}

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return contract.pairs(self.model.empty_past(batch))

    def _open_probes(self) -> None:
        from edgellama import folder as model_folder

        proto = model_folder.load_model_proto(self.folder, with_weights=False)
        if self.static:
            proto = full_logits(proto)
        found = find_probe_values(proto.graph, self.config.num_hidden_layers)
        self._probe_values = {k: v for k, (v, _) in found.items()}
        self.probe_names = {k: n for k, (_, n) in found.items()}
        self._probe_model = with_outputs(self.folder, sorted(set(self._probe_values.values())), proto=proto,
                                         provider=self.provider, threads=self.threads, verify=False)
        if self.static:
            self._static_probes = _StaticRun(self._probe_model, sorted(set(self._probe_values.values())))

    def forward(self, input_ids, attention_mask, position_ids, past, *, probes: bool = False):
        if probes and self._probe_model is None:
            self._open_probes()
        model = self._probe_model if probes else self.model
        if self.static:   # positions follow from the lengths: position_ids is not fed
            run = self._static_probes if probes else self._static
            logits, present, extra = run.forward(input_ids, attention_mask, contract.flatten(past))
        else:
            # OrtModel.forward casts the inputs and the past (to its kv_dtype) itself.
            logits, present, extra = model.forward(input_ids, attention_mask, position_ids, past)
        captured = {}
        if probes:
            for key, value in self._probe_values.items():
                if value in extra:
                    captured[key] = np.asarray(extra[value], dtype=np.float32)
        return np.asarray(logits, dtype=np.float32), contract.pairs(present), captured
