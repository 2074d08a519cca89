"""Children a decoder layer's forward is read through: containers.

A child whose call hands more than one value carrying the hidden states on to what the layer
returns (DBRX's `resid, x = self.norm_attn_norm(x)`: the residual stream after the attention's
join, and the FFN's normed input) holds part of a segment and its join, not a core. Its forward
is read in place of its call, and its children are the layer's units at their dotted paths
(`norm_attn_norm.attn`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InferenceError
from .dataflow import Call, FlowGraph, FlowInterpreter, Item, Op, Pack, Scope
from .source_index import SourceIndex


@dataclass(frozen=True)
class ChildInfo:
    """What the probe knows about one direct child module of the decoder layer."""

    name: str
    class_name: str
    has_params: bool
    has_matrix: bool  # owns a parameter with two or more dimensions (a projection)


def child_infos(module, prefix: str = "") -> dict[str, ChildInfo]:
    """What the probe knows about each direct child of `module`, named `prefix` + its name."""
    out = {}
    for name, child in module.named_children():
        params = list(child.parameters())
        out[prefix + name] = ChildInfo(
            name=prefix + name,
            class_name=type(child).__name__,
            has_params=bool(params),
            has_matrix=any(p.dim() >= 2 for p in params),
        )
    return out


def containers(graph: FlowGraph, instance, children, index: SourceIndex) -> dict[str, Scope]:
    """Children whose call hands more than one value carrying the hidden states on to what the
    layer returns (`residual, x = self.norm_attn_norm(x)`, both used after): each part of a
    segment and its join rather than a core. Their Scope, to read their forward in place."""
    needed = graph.ancestors(graph.returned) | {id(graph.returned)}
    items: dict[str, set[int]] = {}
    stack, seen = [graph.returned], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
        if isinstance(node, Item) and node.inputs and isinstance(node.inputs[0], Call):
            call = node.inputs[0]
            if call.target in children and graph.derived(call) and id(node) in needed:
                if isinstance(node.index, int):
                    items.setdefault(call.target, set()).add(node.index)
    out: dict[str, Scope] = {}
    for name, indices in items.items():
        if len(indices) < 2:
            continue
        module = getattr(instance, name, None)
        grand = child_infos(module) if module is not None else {}
        if not any(c.has_params for c in grand.values()):
            continue
        try:
            parsed, _, func = index.find_method(type(module), "forward")
        except InferenceError:
            continue
        is_child, method_source = scope_answers(module, set(grand), index)
        if len(indices & _stream_positions(module, parsed, func, is_child, method_source)) < 2:
            continue  # one stream and another value (GPT-NeoX-Japanese's attention bias)
        out[name] = Scope(module, parsed, func, is_child, method_source)
    return out


def _stream_positions(module, parsed, func, is_child, method_source) -> set[int]:
    """The positions of the tuple `module.forward` returns that are computed from its input
    (DBRX's norm_attn_norm: both; an attention returning its output and its bias: one)."""
    interp = FlowInterpreter(parsed, module, is_child, method_source)
    try:
        graph = interp.run(func)
    except InferenceError:
        return set()
    packs = [r for r in interp.returns if isinstance(r, Pack)]
    if not packs or len(packs) != len(interp.returns) or not _joins(graph, packs):
        return set()
    return {
        i
        for i in range(min(len(p.inputs) for p in packs))
        if all(graph.derived(p.inputs[i]) for p in packs)
    }


def _joins(graph: FlowGraph, packs) -> bool:
    """Does the forward hold a residual join: an addition of a value that went through one of
    its children to one carrying the input that did not (DBRX's `residual + attn(...)`)? A
    router handing on its probabilities and its choices from one input holds none."""
    calls = {id(c) for c in graph.calls}
    stack, seen = list(packs), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
        if isinstance(node, Op) and node.additive and len(node.inputs) == 2:
            through = [bool(calls & (graph.ancestors(x) | {id(x)})) for x in node.inputs]
            if any(through) and not all(through) and all(map(graph.derived, node.inputs)):
                return True
    return False


def scope_answers(instance: object, children: set[str], index: SourceIndex):
    def is_child(path: str) -> bool:
        return path.split(".")[0] in children

    def method_source(name: str):
        if name in children or not callable(getattr(type(instance), name, None)):
            return None
        try:
            p, _, f = index.find_method(type(instance), name)
        except InferenceError:
            return None
        return p, f

    return is_child, method_source
