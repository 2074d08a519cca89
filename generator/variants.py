"""Decoder-layer children that other configs of the model type add.

A descriptor is generated from one config but used with every checkpoint of its type. A layer's
`__init__` may build a child only under some config values (Falcon's `ln_attn` / `ln_mlp` with
`new_decoder_architecture`, its `post_attention_layernorm` without `parallel_attn`). Such a
child is found statically (built on a branch the probed config did not take), then placed by
analysing the layer of a tiny config with one boolean config flag the layer reads flipped: the
variant's data flow says which subblock it belongs to. A child may be a core there when it works
beside a core the probed layer has too (Gemma 4's `enable_moe_block` experts and router beside its
MLP, one FFN subblock with two cores): its no-op returns zeros, as the other core's does. A child
no flag brings in, or one that would be the only core of a subblock (a different layer kind, such
as LFM2's short convolution instead of attention), stops generation with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .analysis import layer_flow, model_structure
from .errors import InferenceError, StaticGap
from .probe import build_model, layer_children


@dataclass(frozen=True)
class VariantChild:
    name: str
    kind: str  # layer_flow.ATTENTION | layer_flow.FFN | "" (never called by a causal LM)
    evidence: tuple[str, ...]
    flag: str | None = None  # the boolean config field whose flip builds it
    flag_value: bool | None = None
    core: bool = False  # a core of its subblock (beside a core the probed layer has)
    tuple_size: int | None = None  # its call site unpacks a tuple of this size


def variant_children(
    probe, index, layer: nn.Module, stack_path: str, tiny_index: int = 0, known=frozenset()
) -> list[VariantChild]:
    """Children other configs add to `layer` (whose kind is layer `tiny_index` of the tiny
    model), each with its subblock. Children of the stack's other layer kinds (`known`) are not
    variants: they are analysed with their own kind."""
    optional = model_structure.optional_modules(index, type(layer), layer)
    optional = {
        n: w
        for n, w in optional.items()
        if n not in dict(layer.named_children()) and n not in known
    }
    if not optional:
        return []
    probed = set(dict(layer.named_children()))
    found: dict[str, VariantChild] = {}
    for name, guard in _argument_guarded_calls(index, type(layer), list(optional)).items():
        found[name] = VariantChild(
            name,
            "",
            (
                optional[name],
                f"{guard}: forward calls it only when given an input a causal LM never passes; "
                "not grouped",
            ),
        )
    tiny_text = probe.tiny_config().get_text_config()
    flags = []
    for field, _where in model_structure.config_reads(index, type(layer)):
        if isinstance(getattr(tiny_text, field, None), bool) and field not in flags:
            flags.append(field)
    for flag in flags:
        config = probe.tiny_config()
        value = not getattr(config.get_text_config(), flag)
        setattr(config.get_text_config(), flag, value)
        try:
            model = build_model(probe.source.causal_lm_cls, config)
            variant = model.get_submodule(f"{stack_path}.{tiny_index}")
        except StaticGap:
            raise  # a static build that cannot tell (generator/static_build.py)
        except Exception:
            continue
        children = layer_children(variant)
        new = [n for n in optional if n in children and n not in found]
        if not new:
            continue
        try:
            flow = layer_flow.analyze_layer(type(variant), variant, children, index)
        except InferenceError:
            continue
        for name in new:
            if name not in flow.called:
                # built, but never called by a causal LM (GPT-2's cross-attention runs only
                # with encoder states): nothing of a decoder-only checkpoint to group
                found[name] = VariantChild(
                    name,
                    "",
                    (
                        optional[name],
                        f"probe: with {flag}={value!r} the layer has {name}, but its forward "
                        "does not call it without encoder inputs: not grouped",
                    ),
                )
                continue
            for kind, sb in flow.subblocks.items():
                beside = [c for c in sb.cores if c != name and c in probed]
                if name in sb.members and (name not in sb.cores or beside):
                    core = name in sb.cores
                    found[name] = VariantChild(
                        name,
                        kind,
                        (
                            optional[name],
                            f"probe: with {flag}={value!r} the layer has {name}, in its {kind} "
                            "segment" + (f", a core beside {', '.join(beside)}" if core else ""),
                        )
                        + ((flow.sites[name],) if flow.arity.get(name) else ()),
                        flag,
                        value,
                        core,
                        flow.arity.get(name),
                    )
            if name not in found and name in flow.shared:
                found[name] = VariantChild(
                    name,
                    layer_flow.ATTENTION,
                    (optional[name], f"probe: with {flag}={value!r} {name} feeds both subblocks"),
                    flag,
                    value,
                )
    missing = [n for n in optional if n not in found]
    if missing:
        raise InferenceError(
            f"the subblock of {', '.join(missing)} (built by other configs)",
            f"{type(layer).__name__}.__init__ builds them on a branch the default config does "
            "not take, and no boolean config flag the layer reads brings them in as a non-core "
            "member of a subblock (another layer kind, as in a hybrid stack?)",
            [optional[n] for n in missing],
        )
    return list(found.values())


def _argument_guarded_calls(index, cls: type, names: list[str]) -> dict[str, str]:
    """Children whose every call in `cls.forward` sits under `if <arg> is not None` (or `if <arg>`)
    for a forward argument that defaults to None (GPT-2's cross-attention under
    `encoder_hidden_states`): name -> where the guard is."""
    import libcst as cst

    from .analysis.source_index import dotted

    try:
        parsed, _, func = index.find_method(cls, "forward")
    except InferenceError:
        return {}
    p = func.params
    optional_args = {
        x.name.value
        for x in (*p.params, *p.kwonly_params)
        if isinstance(x.default, cst.Name) and x.default.value == "None"
    }

    def guard_of(test) -> str | None:
        if isinstance(test, cst.Name) and test.value in optional_args:
            return test.value
        if (
            isinstance(test, cst.Comparison)
            and isinstance(test.left, cst.Name)
            and test.left.value in optional_args
            and len(test.comparisons) == 1
            and isinstance(test.comparisons[0].operator, cst.IsNot)
            and isinstance(test.comparisons[0].comparator, cst.Name)
            and test.comparisons[0].comparator.value == "None"
        ):
            return test.left.value
        return None

    calls: dict[str, list[str | None]] = {n: [] for n in names}

    def visit(node, guard: str | None) -> None:
        if isinstance(node, cst.If):
            inner = guard or (
                f"{parsed.where(node)} `if {parsed.code(node.test)}`"
                if guard_of(node.test)
                else None
            )
            visit(node.test, guard)
            for stmt in node.body.body:
                visit(stmt, inner)
            if node.orelse is not None:
                visit(node.orelse, guard)
            return
        if isinstance(node, cst.Call):
            name = dotted(node.func) or ""
            if name.startswith("self.") and name[5:] in calls:
                calls[name[5:]].append(guard)
        for child in node.children:
            visit(child, guard)

    visit(func.body, None)
    return {n: g[0] for n, g in calls.items() if g and all(g)}
