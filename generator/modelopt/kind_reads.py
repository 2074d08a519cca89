"""What the Model Optimizer target reads of a spec's layer kinds beyond their plain fields: the
overrides of one subblock, its core modules and weight modules, where the kind occurs, and the
selector that tells its layers apart (rendered as a condition, or evaluated on a built layer)."""

from __future__ import annotations

import importlib

from ..descriptor_view import kinds_condition, layer_ranges
from ..spec import DescriptorSpec

SUBBLOCK_KINDS = ("attention", "ffn")


def kind_overrides(kind, which: str | None = None) -> tuple:
    """The overrides proven on a layer of `kind`, those of subblock `which` when given (a
    block-config path prefix such as "ffn" or "attention.mamba")."""
    return tuple(
        o for o in kind.overrides if which is None or o.block_config_attr.startswith(f"{which}.")
    )


def kind_override(kind, attr: str):
    """The override of `kind` that sets block-config size `attr`, or None."""
    for o in kind.overrides:
        if o.block_config_attr == attr:
            return o
    return None


def kind_cores(kind, which: str) -> list[str]:
    """The layer children that compute subblock `which` (what a no-op replaces by zeros, or by
    the residual they add themselves), in data-flow order."""
    sb = kind.subblock(which)
    if sb is None:
        return []
    zeros = ("MatchingZeros", "PassResidual", "ProjectedZeros")
    return [r.attr for r in sb.replacements if r.replacement in zeros]


def kind_weight_modules(kind, which: str) -> tuple[str, ...]:
    """The layer children whose tensors belong to subblock `which` of a layer kind."""
    sb = kind.subblock(which)
    return () if sb is None else sb.weight_modules


def kind_where(kind) -> str:
    """The layers of the default config the kind has, or how other configs build it."""
    if kind.built_by:
        return f"no layer of the default config; configs with {kind.built_by} build it"
    many = "s" if len(kind.layers) > 1 else ""
    return f"layer{many} {layer_ranges(kind.layers)} of the default config"


def kind_condition(spec: DescriptorSpec, kind) -> str:
    """The Python condition on `decoder_layer` that holds for the layers of `kind` only (the
    one the descriptor's no-ops dispatch on)."""
    return kinds_condition([kind], spec)


def kind_holds(spec: DescriptorSpec, kind, layer) -> bool:
    """Whether a built layer is of `kind` (its selector, evaluated here)."""
    from ..kinds import holds  # torch: imported where a layer is built anyway

    if len(spec.kinds) == 1:
        return True
    classes = {}
    for t in kind.selector:
        if t.cls is not None:
            classes[t.cls] = getattr(importlib.import_module(t.cls.module), t.cls.name)
    return all(holds(t, layer, classes) for t in kind.selector)


def first_layer_of(spec: DescriptorSpec, kind, model) -> int | None:
    """The index of the first layer of `kind` in a built model, or None."""
    for i, layer in enumerate(model.get_submodule(spec.layer_stack)):
        if kind_holds(spec, kind, layer):
            return i
    return None


def selector_classes(spec: DescriptorSpec) -> list:
    """The classes (ClassRef) the kind selectors test."""
    refs = []
    for kind in spec.kinds:
        for t in kind.selector:
            if t.cls is not None and t.cls not in refs:
                refs.append(t.cls)
    return refs


def no_op_stand_ins(spec: DescriptorSpec) -> set[str]:
    """The no-op stand-in classes the descriptor's no-op methods use (Same, MatchingZeros...)."""
    return {
        r.replacement
        for kind in spec.kinds
        for which in SUBBLOCK_KINDS
        if (sb := kind.subblock(which)) is not None
        for r in sb.replacements
    }
