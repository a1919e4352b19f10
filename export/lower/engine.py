"""The rule engine every lowering target shares: rules, the driver, its report, and pruning.

A target is an ordered set of rules, each lowering one `edgellama` function op (RMSNorm,
RotaryEmbedding, GroupQueryAttention) to a runtime's own kernel. A rule's `check` returns the
reason it refuses a node (None when it accepts) and its `rewrite` replaces the node. For each
`edgellama` node the driver tries the rules for its op in order of preference: the first that
accepts rewrites it, every refusal before that is reported. A refused node keeps its function
node, whose standard-ONNX body every runtime inlines, so a refusal costs speed, never validity.
Afterwards function bodies and opsets nothing uses any more are dropped with onnx_ir's
`RemoveUnusedFunctionsPass` and `RemoveUnusedOpsetsPass`.

Why not onnxscript's rewriter (`RewriteRuleClassBase`/`RewriteRuleSet`), which matches custom
domains too: (1) the refusal report is what this engine is for, and `RewriteRuleSet` only exposes
why a rule did not apply through its `MatchingTracer`, with which it applies no rewrite at all;
(2) the fused residual norm takes over an `Add` whose sum is also read outside the pattern, which
the pattern matcher refuses as a non-removable node; (3) lowered nodes keep the function node's
name (parity probes find blocks by it) and outputs keep their value names (the graph contract);
(4) graph-wide values (sequence lengths, the attention bias) are built once and shared by every
layer's rewrite. Each of these would need working around the rewriter; the loop below is short.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

EDGELLAMA = "edgellama"


@dataclasses.dataclass(frozen=True)
class Refusal:
    node: str      # node name, e.g. "model.layers.0.input_layernorm/RMSNorm"
    rewrite: str   # the rule's name, e.g. "skip_simplified_layer_norm"
    reason: str


@dataclasses.dataclass(frozen=True)
class Lowered:
    node: str
    rewrite: str


@dataclasses.dataclass
class Report:
    """What one lowering did: the nodes each rule rewrote and every refusal with its reason."""

    lowered: list[Lowered] = dataclasses.field(default_factory=list)
    refused: list[Refusal] = dataclasses.field(default_factory=list)


class Context:
    """What the rules share: the graph, the target provider, and graph-wide derived values
    (sequence lengths, attention bias) built once and reused by every layer."""

    def __init__(self, graph: ir.Graph, provider: str | None = None):
        self.graph = graph
        self.provider = provider
        self.cache: dict[Any, Any] = {}

    def rewire(self, old_values: list[ir.Value], new_values: list[ir.Value]) -> None:
        """Point every use of `old_values` at `new_values`, graph outputs included, and give the new
        values the old names, shapes and types, so the graph contract is unchanged."""
        for old, new in zip(old_values, new_values):
            name, shape, type_ = old.name, old.shape, old.type
            old.name = None
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            new.name, new.shape, new.type = name, shape, type_

    def replace(self, old: ir.Node, new: ir.Node) -> None:
        """Put `new` in the place of `old`, its outputs taking over those of `old`."""
        self.graph.insert_before(old, new)
        self.rewire(list(old.outputs), list(new.outputs))
        self.graph.remove(old, safe=True)


class Rule:
    """One node-level lowering of the edgellama op `op_type`."""

    name: ClassVar[str]
    op_type: ClassVar[str]

    def check(self, node: ir.Node, ctx: Context) -> str | None:
        """Why this rule refuses `node` (None when it accepts)."""
        raise NotImplementedError

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        raise NotImplementedError


def apply(ir_model: ir.Model, rules: Iterable[Rule], ctx: Context) -> Report:
    """Lower every edgellama node of `ir_model`'s graph with `rules` (in place), then prune."""
    chain: dict[str, list[Rule]] = {}
    for rule in rules:   # per op, in order of preference
        chain.setdefault(rule.op_type, []).append(rule)
    report = Report()
    for node in list(ctx.graph):
        if node.domain != EDGELLAMA or node.graph is None:
            continue   # not ours, or already consumed by an earlier fusion
        name = node.name or node.op_type
        for rule in chain.get(node.op_type, []):
            reason = rule.check(node, ctx)
            if reason is None:
                rule.rewrite(node, ctx)
                report.lowered.append(Lowered(name, rule.name))
                break
            report.refused.append(Refusal(name, rule.name, reason))
    prune(ir_model)
    return report


def prune(ir_model: ir.Model) -> None:
    """Drop function bodies no node calls any more, then the opsets (edgellama) nothing uses."""
    RemoveUnusedFunctionsPass()(ir_model)
    # Function bodies keep their own imports: only the model's are pruned.
    RemoveUnusedOpsetsPass(process_functions=False)(ir_model)


# -- what rules ask of a node -------------------------------------------------------------------------
def static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def inputs_refusal(node: ir.Node, inputs: tuple[str, ...]) -> str | None:
    if len(node.inputs) != len(inputs) or any(v is None for v in node.inputs):
        return f"expected inputs ({', '.join(inputs)}), got {len(node.inputs)}"
    return None


def arity(node: ir.Node, inputs: tuple[str, ...], outputs: int) -> str | None:
    if (reason := inputs_refusal(node, inputs)) is not None:
        return reason
    if len(node.outputs) != outputs:
        return f"expected {outputs} outputs, got {len(node.outputs)}"
    return None


def int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None and attr.type == ir.AttributeType.INT else None


def float_attr(node: ir.Node, name: str) -> float | None:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None and attr.type == ir.AttributeType.FLOAT else None
