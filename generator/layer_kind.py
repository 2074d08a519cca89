"""One layer kind of the stack, analysed on its first layer: its attention and FFN subblocks
(members in data-flow order, cores, what each returns and hands back), the no-op stand-in of
every member, the overrides and the children other configs add (a stage of generator/infer.py,
which builds the spec from these).

The static calls of the layer's forward are confirmed against a traced forward of a tiny model
first (`_confirm_calls`); generation stops, naming both findings, where they disagree.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from . import kinds
from .analysis import layer_flow
from .analysis.layer_flow import ATTENTION, FFN, LayerFlow
from .descriptor_view import layer_ranges
from .errors import InferenceError, ProbeMismatch
from .layer_weights import has_params, layer_unit
from .overrides import infer_overrides
from .probe import layer_children
from .spec import (
    BLOCK_CONFIG_ATTRS,
    CarriedArgument,
    ConfigOverride,
    ConfigVariant,
    LayerKind,
    ModuleReplacement,
    Subblock,
    is_identifier,
)
from .static_returns import carried_arguments
from .variants import variant_children


def layer_units(layer: nn.Module, flow: LayerFlow) -> dict[str, nn.Module]:
    """The units the layer's forward was read in: its children, and in place of a child whose
    forward was read through (a container), that child's children at their dotted paths."""
    out: dict[str, nn.Module] = {}
    for name, child in layer.named_children():
        if name in flow.containers:
            out.update({f"{name}.{n}": c for n, c in child.named_children()})
        else:
            out[name] = child
    return out



def _layer_kind(ctx, group, label, selector, stack_path, tiny_kind, every_child):
    """Analyse the first layer of a kind: its subblocks, no-op plans, overrides, variants."""
    probe = ctx.probe
    tiny_index = tiny_kind.layers[0]
    layer = group.modules[0]
    flow = layer_flow.analyze_layer(type(layer), layer, layer_children(layer), ctx.index)
    tiny_path = f"{stack_path}.{tiny_index}"
    arity, lists = _confirm_calls(ctx, flow, tiny_path)
    subblocks: dict[str, Subblock] = {}
    found: list[ConfigOverride] = []
    for kind in (ATTENTION, FFN):
        if kind not in flow.subblocks:
            ctx.fact(
                f"{kind} subblock",
                "none",
                [f"{flow.class_name}: no residual segment of this kind"] + flow.evidence,
            )
            continue
        sb = flow.subblocks[kind]
        subblocks[kind] = _subblock(ctx, flow, kind, arity, lists, stack_path, group)
        found.extend(infer_overrides(ctx, kind, sb, layer, tiny_path, tiny_kind, stack_path))
    if not subblocks:
        raise InferenceError(
            f"the subblocks of {flow.class_name}", "no residual segment", flow.evidence
        )
    _check_coverage(ctx, flow, layer, subblocks)
    variants: list[ConfigVariant] = []
    for child in variant_children(
        probe, ctx.index, layer, stack_path, tiny_index, known=every_child
    ):
        flag = child.flag if child.flag and is_identifier(child.flag) else None
        variants.append(
            ConfigVariant(child.name, child.kind, flag, child.flag_value if flag else None)
        )
        if not child.kind:
            ctx.fact(f"{child.name} (other configs)", "not grouped", child.evidence)
            continue
        if not is_identifier(child.name):
            raise InferenceError("a layer child other configs add", repr(child.name))
        sb = subblocks.get(child.kind)
        if sb is None:
            raise InferenceError(
                f"the subblock of {child.name} (built by other configs)",
                f"it belongs to the {child.kind} subblock, which this layer kind lacks",
                child.evidence,
            )
        why = (
            "built by other configs; a core beside this subblock's: zeros on a no-op"
            if child.core
            else "built by other configs; passes its input through on a no-op"
        )
        replacement = ModuleReplacement(
            child.name,
            "MatchingZeros" if child.core else "Same",
            child.tuple_size,
            (why,) + child.evidence,
        )
        subblocks[child.kind] = dataclasses.replace(
            sb,
            replacements=sb.replacements + (replacement,),
            weight_modules=sb.weight_modules + (child.name,),
        )
        ctx.fact(f"{child.name} (other configs)", f"in the {child.kind} subblock", child.evidence)
    own = own_tensors(layer)
    for name in own:
        if not is_identifier(name):
            raise InferenceError("a tensor of the layer itself", repr(name))
    if own:
        ctx.fact(
            "tensors of the layer itself",
            ", ".join(own),
            [
                f"probe: {flow.class_name} holds {', '.join(own)} directly (Doge's learned "
                "residual scales, Gemma 4's layer_scalar buffer): no no-op replaces them; "
                "grouped with the attention subblock"
            ],
        )
    if flow.shared:
        ctx.fact(
            "shared modules",
            ", ".join(flow.shared),
            [
                f"used by both subblocks of the {flow.layout} layout: left in place on a no-op; "
                "their weights are grouped with the attention subblock"
            ],
        )
    kind = LayerKind(
        label=label,
        layer_class=kinds.ref(group.layer_class),
        children=group.names,
        layers=tuple(group.layers),
        layout=flow.layout,
        attention=subblocks.get(ATTENTION),
        ffn=subblocks.get(FFN),
        shared_modules=tuple(flow.shared),
        own_tensors=own,
        selector=selector,
        evidence=(
            (
                (
                    f"probe: layers {layer_ranges(group.layers)} of the probed config are "
                    f"{group.layer_class.__name__}s with {', '.join(group.names)}"
                )
                if group.layers
                else (
                    f"probe: a config with {group.built_by} for its last layer builds a "
                    f"{group.layer_class.__name__} with {', '.join(group.names)} there"
                )
            ),
        ),
        built_by=group.built_by,
        overrides=tuple(
            sorted(
                {(o.block_config_attr, o.config_field): o for o in found}.values(),
                key=lambda o: BLOCK_CONFIG_ATTRS.index(o.block_config_attr),
            )
        ),
    )
    return kind, found, variants



def _width_changing_linear(layers, name: str) -> tuple[int, int] | None:
    """(in, out) features when child `name` of the kind's layers is an nn.Linear whose output
    width differs from its input's (Gemma 4's per-layer input gate and projection): a no-op
    stand-in must give zeros of its output width. None otherwise."""
    for layer in layers:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Linear) and child.in_features != child.out_features:
            return child.in_features, child.out_features
    return None



def own_tensors(layer: nn.Module) -> tuple[str, ...]:
    """The state-dict tensors the layer holds itself: its parameters (Doge's residual scales)
    and its persistent buffers (Gemma 4's `layer_scalar`, which multiplies the layer's output)."""
    params = [n for n, _ in layer.named_parameters(recurse=False)]
    skip = getattr(layer, "_non_persistent_buffers_set", set())
    buffers = [n for n, _ in layer.named_buffers(recurse=False) if n not in skip]
    return tuple(params + buffers)



def _confirm_calls(
    ctx, flow: LayerFlow, layer_path: str
) -> tuple[dict[str, int | None], frozenset[str]]:
    """Compare the static calls with a traced forward of a tiny model; return tuple sizes, and
    the children whose traced call returned a list rather than a tuple (OpenAI-GPT's attention:
    its block does `[h] + outputs[1:]`, so a no-op stand-in must return a list too)."""
    layer = ctx.probe.module(layer_path)
    units = layer_units(layer, flow)
    # a container's children are traced in its place (DBRX's norm_attn_norm.attn)
    trace = (
        ctx.probe.trace_layer(layer_path, tuple(units))
        if flow.containers
        else ctx.probe.trace_layer(layer_path)
    )
    weighted = {n for n, c in units.items() if has_params(c)}
    static_called = set(flow.called) & weighted
    traced_called = set(trace) & weighted
    if static_called != traced_called:
        raise ProbeMismatch(
            f"the modules {flow.class_name}.forward calls",
            ", ".join(sorted(static_called)) or "none",
            f"a traced forward calls {', '.join(sorted(traced_called)) or 'none'}",
        )
    arity: dict[str, int | None] = {}
    for name in flow.called:
        static = flow.arity.get(name)
        traced = trace[name].tuple_size if name in trace else static
        if (
            static is not None
            and traced is not None
            and static != traced
            and not flow.indexed.get(name)
        ):
            raise ProbeMismatch(
                f"what {name} returns",
                f"a tuple of {static} (unpacked at its call site)",
                f"a traced call returns {traced} values",
            )
        if static is None and traced is not None and not flow.indexed.get(name):
            raise ProbeMismatch(
                f"what {name} returns",
                "a tensor (used directly at its call site)",
                f"a traced call returns a tuple of {traced}",
            )
        arity[name] = traced if traced is not None else static
    lists = frozenset(n for n in flow.called if n in trace and trace[n].returns_list)
    return arity, lists



def _subblock(ctx, flow: LayerFlow, kind: str, arity, lists, stack_path: str, group) -> Subblock:
    sb = flow.subblocks[kind]
    replacements = []
    for name in sb.members:
        core = name in sb.cores
        size = arity.get(name)
        as_list = size is not None and name in lists
        carried = _carried(ctx, group.modules[0], name, size, as_list, flow.sites.get(name, ""))
        if name in sb.residual_args:
            position, keyword = sb.residual_args[name]
            if not is_identifier(keyword):
                raise InferenceError(f"the residual argument of {name}", f"{keyword!r}")
            why = "core that adds the residual it is passed: its no-op returns that residual"
            replacements.append(
                ModuleReplacement(
                    name,
                    "PassResidual",
                    size,
                    (why,),
                    position,
                    keyword,
                    returns_list=as_list,
                    carried=carried,
                )
            )
            continue
        why = (
            "core: its output joins the residual, so zeros make the subblock a no-op"
            if core
            else ("passes its input through")
        )
        # where a segment mixes in a layer argument (Gemma 4's `act(gate(h)) * per_layer_input`),
        # a member's output meets a tensor of that member's own output width: passing the input
        # through or zeros like it would have the wrong width there. Elsewhere a chain of plain
        # stand-ins ends in the sink core's zeros like its (passed-through) input, as before.
        projection = _width_changing_linear(group.modules, name) if sb.layer_inputs else None
        if projection is not None:
            replacements.append(
                ModuleReplacement(
                    name,
                    "ProjectedZeros",
                    size,
                    (
                        f"probe: an nn.Linear from {projection[0]} to {projection[1]} features "
                        "inside the subblock: zeros like its input would have the wrong width for "
                        "what reads its output, so its no-op returns zeros out_features wide",
                    ),
                    returns_list=as_list,
                    width_attr="out_features",
                )
            )
            continue
        judge = sb.judges[sb.cores.index(name)] if core and sb.judges else name
        if judge != name:
            why = (
                f"core that adds its input to its output: it refines {judge}, whose inputs make "
                f"this the {kind} subblock; zeros make the subblock a no-op"
            )
        replacements.append(
            ModuleReplacement(
                name,
                "MatchingZeros" if core else "Same",
                size,
                (why,),
                refines=judge if judge != name else None,
                returns_list=as_list,
                carried=carried,
            )
        )
    # a child may hold weights in some layers only (ModernBERT-decoder's attn_norm is an
    # Identity in layer 0): weights in any layer of the kind count
    layers = group.modules
    weight_modules = tuple(
        n
        for n in sb.members
        if any(has_params(m) for each in layers if (m := layer_unit(each, n)) is not None)
    )
    ctx.fact(
        f"{kind} subblock",
        " -> ".join(sb.members),
        sb.evidence,
    )
    for name in sb.cores:
        size = arity.get(name)
        ctx.fact(
            f"{name} returns",
            (
                (f"a list of {size}" if name in lists else f"a tuple of {size}")
                if size
                else "a tensor"
            ),
            [flow.sites[name], ctx.probe.trace_evidence],
        )
    return Subblock(
        kind,
        tuple(replacements),
        weight_modules,
        tuple(sb.joins),
        tuple(sb.evidence),
        tuple(sb.layer_inputs),
    )



def _carried(ctx, owner: nn.Module, name: str, size, as_list: bool, site: str):
    """The arguments child `name` of `owner` hands back in the tuple it returns (a recurrent
    state, RWKV's `return out, state`): its no-op stand-in hands them back too, since the caller
    threads them on (`attention, state = self.attention(x, state=state)`)."""
    if not size or as_list:
        return ()
    module = getattr(owner, name, None)
    if not isinstance(module, nn.Module):
        return ()
    found = carried_arguments(module, ctx.index)
    return _carried_facts(ctx, name, f"{name}.forward", found, size, site)



def _carried_facts(ctx, name: str, forward: str, found: dict, size: int, site: str):
    out = []
    for index, (keyword, position) in sorted(found.items()):
        if index >= size:
            continue
        why = (
            f"{forward} returns its argument {keyword!r} unchanged at place {index} of its "
            "tuple, on every path (read from its source)"
        )
        ctx.fact(
            f"{name} hands back", f"{keyword} at place {index}", [why] + ([site] if site else [])
        )
        out.append(CarriedArgument(index, keyword, position, (why,)))
    return tuple(out)



def _check_coverage(ctx, flow: LayerFlow, layer: nn.Module, subblocks) -> None:
    assigned = set(flow.shared)
    for sb in subblocks.values():
        assigned |= {r.attr for r in sb.replacements}
    lost = [n for n, c in layer_units(layer, flow).items() if has_params(c) and n not in assigned]
    if lost:
        raise InferenceError(
            f"the subblock of {', '.join(lost)}",
            f"{flow.class_name}.forward does not use them in a residual segment",
        )
