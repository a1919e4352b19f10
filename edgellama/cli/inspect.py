"""Summarize an exported model folder (or a bare .onnx file): ops by domain and count, function
ops, inputs and outputs with their dims, size on disk, and the manifest.

With --json, one object instead (schema "edgellama.inspect", version 1): `path`, `opsets`
({domain: version}), `ops` ({domain: {op: count}}), `nodes`, `functions` ([{domain, name, nodes,
body_ops}]), `inputs` and `outputs` ([{name, dtype, dims}]; a dim is a number or a symbolic
name), `initializers` (count), `bytes` (on disk), `manifest` (edgellama.json, or null for a bare
.onnx file).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

from edgellama.errors import ModelFolderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path, help="model folder or .onnx file")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields above) instead of text")


def _dims(value_info: Any) -> list[Any]:
    t = value_info.type.tensor_type
    return [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else []


def summarize(path: Path) -> dict[str, Any]:
    """The facts `inspect` prints, as a dict (also used by tests and bench scripts)."""
    import onnx

    from edgellama import folder as model_folder

    path = Path(path)
    manifest = None
    if path.is_dir():
        manifest = model_folder.read_manifest(path).to_dict()
        model = model_folder.load_model_proto(path, with_weights=False)
        root = path
    elif path.is_file():
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:
            raise ModelFolderError(f"{path} is not an ONNX model: {e}") from None
        model_folder.check_external_data(model, path.parent)
        root = path.parent
    else:
        raise ModelFolderError(f"{path} does not exist")
    ops = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    by_domain: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (domain, op), n in sorted(ops.items()):
        by_domain[domain][op] = n
    elem = onnx.TensorProto.DataType.Name
    size = sum(f.stat().st_size for f in root.iterdir() if f.is_file()) if path.is_dir() else (
        path.stat().st_size + sum((root / loc).stat().st_size for loc in set(model_folder.external_data_paths(model))
                                  if (root / loc).is_file()))
    return {
        "path": str(path),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ops": by_domain,
        "nodes": len(model.graph.node),
        "functions": [{"domain": f.domain, "name": f.name, "nodes": len(f.node),
                       "body_ops": sorted({n.op_type for n in f.node})} for f in model.functions],
        "inputs": [{"name": i.name, "dtype": elem(i.type.tensor_type.elem_type).lower(), "dims": _dims(i)}
                   for i in model.graph.input],
        "outputs": [{"name": o.name, "dtype": elem(o.type.tensor_type.elem_type).lower(), "dims": _dims(o)}
                    for o in model.graph.output],
        "initializers": len(model.graph.initializer),
        "bytes": size,
        "manifest": manifest,
    }


def _io_lines(rows: list[dict[str, Any]], limit: int = 8) -> list[str]:
    lines = [f"  {r['name']:<28} {r['dtype']:<8} [{', '.join(map(str, r['dims']))}]" for r in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more of the same pattern")
    return lines


def run(args: argparse.Namespace) -> int:
    s = summarize(args.model)
    if args.json:
        from edgellama.cli.output import print_json

        print_json("inspect", s)
        return 0
    out = [f"{s['path']}: {s['nodes']} nodes, {s['initializers']} initializers, {s['bytes'] / 2**20:.1f} MiB",
           "opsets: " + ", ".join(f"{d} {v}" for d, v in s["opsets"].items()), "ops:"]
    for domain, ops in s["ops"].items():
        out.append(f"  {domain}: " + ", ".join(f"{op} x{n}" for op, n in ops.items()))
    if s["functions"]:
        out.append("function ops:")
        out += [f"  {f['domain']}.{f['name']}: {f['nodes']} body nodes ({', '.join(f['body_ops'])})"
                for f in s["functions"]]
    out += ["inputs:", *_io_lines(s["inputs"]), "outputs:", *_io_lines(s["outputs"])]
    m = s["manifest"]
    if m:
        src = m.get("source", {})
        quant = ", ".join(str(q.get("pass") or q.get("mode") or q) for q in m.get("quantization", [])) or "none"
        out.append(f"manifest: source {src.get('kind')}:{src.get('name')} (sha256 {str(src.get('sha256'))[:12]}), "
                   f"target {m.get('target')}, dtype {m.get('dtype')}, quantization {quant}, opset {m.get('opset')}")
        cfg = m.get("config", {})
        out.append(f"  config: {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                   f"{cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')} heads, "
                   f"vocab {cfg.get('vocab_size')}, rope {cfg.get('rope_scaling') or 'default'}")
    print("\n".join(out))
    return 0
