"""What the descriptor template reads besides the spec: the views a template cannot compute
cleanly (import lines, the no-op plan of each subblock per layer kind, the overrides grouped by
the part of a block config they read). Every string here is a validated identifier, a class
reference, or a literal rendered through repr.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PuzzleGenError
from .spec import ClassRef, ConfigOverride, DescriptorSpec, KindTest, LayerKind, is_dotted_path
from .spec import is_identifier

RUNTIME = "puzzletron_runtime"
REMOTE_PREFIX = "transformers_modules."  # where transformers imports a checkpoint's own code
# Names the descriptor template itself uses: an imported class must not shadow them.
TEMPLATE_NAMES = {
    "re", "sys", "Any", "nn", "_remote_class", "__all__", "overrides", "decoder_layer",
    "ModelDescriptor", "ModelDescriptorFactory", "BlockConfig", "Same", "MatchingZeros",
    "PassResidual", "ProjectedZeros", "return_tuple_of_size", "return_list_of_size",
    "return_tuple_carrying", "DummyBlock", "rebuild_buffers", "move_to_sole_subblock",
    "group_by_layer_kind",
    # the Model Optimizer target's (templates/modelopt_descriptor.py.j2)
    "PreTrainedModel", "dataclass", "field", "_rebuild_buffers", "_TupleDummyBlock",
    "_move_to_sole_subblock", "_group_by_layer_kind", "_split_roles", "_carry_plain_attributes",
    "_copy_plain_attributes", "_Hollow", "_carry_structure", "before", "dummy",
}  # fmt: skip
TITLES = {"attention": "Attention", "ffn": "FFN"}
METHODS = {"attention": "attn_no_op_post_init", "ffn": "mlp_no_op_post_init"}


def is_remote(ref: ClassRef) -> bool:
    return ref.module.startswith(REMOTE_PREFIX)


def class_expr(ref: ClassRef) -> str:
    """How a method body names a class: its imported name, or for the checkpoint's own code
    (importable only after transformers loaded it) a lookup at call time."""
    if not is_remote(ref):
        return ref.name
    module = ref.module.rpartition(".")[2]
    return f"_remote_class({module!r}, {ref.name!r})"


def referenced_classes(spec: DescriptorSpec) -> list[ClassRef]:
    """Every class the module names: the decoder layers and the classes kind tests check."""
    refs = list(spec.decoder_layer_classes)
    for kind in spec.kinds:
        for t in kind.selector:
            if t.cls is not None and t.cls not in refs:
                refs.append(t.cls)
    return refs


# -- no-ops ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One branch of a no-op method: the layer kinds it serves and what it replaces."""

    condition: str | None  # a Python condition on `decoder_layer`; None: every layer
    labels: tuple[str, ...]
    replacements: tuple  # ModuleReplacement, in data-flow order; empty: nothing to replace


@dataclass(frozen=True)
class NoOpView:
    title: str
    method: str
    cases: tuple[Case, ...]
    dispatch: bool  # several cases: the method tests the layer's kind


def _plan(kind: LayerKind, which: str) -> tuple:
    sb = kind.subblock(which)
    return () if sb is None else sb.replacements


def _test_expr(test: KindTest, spec: DescriptorSpec) -> str:
    everywhere = test.child is not None and all(test.child in k.children for k in spec.kinds)
    if test.value is not None:
        attr = (
            f"decoder_layer.{test.child}"
            if _kept_by_every_kind(test.child, spec)
            else f"getattr(decoder_layer, {test.child!r}, None)"
        )
        return f"{attr} == {test.value!r}"
    if test.child is None:
        return f"isinstance(decoder_layer, {class_expr(test.cls)})"
    if test.cls is None:
        return f"{'not ' if test.negate else ''}hasattr(decoder_layer, {test.child!r})"
    child = (
        f"decoder_layer.{test.child}"
        if everywhere
        else f"getattr(decoder_layer, {test.child!r}, None)"
    )
    return f"isinstance({child}, {class_expr(test.cls)})"


def _kept_by_every_kind(attr: str, spec: DescriptorSpec) -> bool:
    """Whether every kind's selector reads `attr` as a plain attribute (so every layer has it)."""
    return all(any(t.child == attr and t.value is not None for t in k.selector) for k in spec.kinds)


def kinds_condition(kinds: list[LayerKind], spec: DescriptorSpec) -> str:
    """The Python condition on `decoder_layer` that holds for the layers of `kinds` only (what
    the descriptor's no-ops, and the converter of a stack of several kinds, dispatch on)."""
    tests = [k.selector for k in kinds]
    if (
        len(kinds) > 1
        and all(len(t) == 1 and t[0].child and t[0].cls for t in tests)
        and len({t[0].child for t in tests}) == 1
    ):
        # one child, several classes: one isinstance with a tuple
        merged = KindTest(tests[0][0].child, None)
        child = _test_expr(KindTest(merged.child, tests[0][0].cls), spec).split(", ")[0]
        classes = ", ".join(class_expr(t[0].cls) for t in tests)
        return f"{child}, ({classes}))"
    if (
        len(kinds) > 1
        and all(len(t) == 1 and t[0].value is not None for t in tests)
        and len({t[0].child for t in tests}) == 1
    ):
        # one attribute, several values
        attr = _test_expr(tests[0][0], spec).rpartition(" == ")[0]
        return f"{attr} in ({', '.join(repr(t[0].value) for t in tests)})"
    parts = []
    for k in kinds:
        tests = [_test_expr(t, spec) for t in k.selector]
        joined = " and ".join(tests)
        parts.append(f"({joined})" if len(tests) > 1 and len(kinds) > 1 else joined)
    return " or ".join(parts)


def no_op_views(spec: DescriptorSpec) -> list[NoOpView]:
    views = []
    for which in ("attention", "ffn"):
        plans: dict[tuple, list[LayerKind]] = {}
        for k in spec.kinds:
            plans.setdefault(_plan(k, which), []).append(k)
        if len(plans) == 1:
            ((plan, kinds),) = plans.items()
            cases = (Case(None, tuple(k.label for k in kinds), plan),)
        else:
            cases = tuple(
                Case(kinds_condition(kinds, spec), tuple(k.label for k in kinds), plan)
                for plan, kinds in plans.items()
            )
        views.append(NoOpView(TITLES[which], METHODS[which], cases, len(cases) > 1))
    return views


def no_op_names(spec: DescriptorSpec) -> set[str]:
    names = set()
    for k in spec.kinds:
        for which in ("attention", "ffn"):
            for r in _plan(k, which):
                names.add(r.replacement)
                if r.carried:
                    names.add("return_tuple_carrying")
                elif r.tuple_size:
                    names.add("return_list_of_size" if r.returns_list else "return_tuple_of_size")
    return names


# -- overrides ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverrideGroup:
    """Overrides that read one optional part of a block config (`ffn.moe`, `attention.mamba`):
    set only when the block config has it. `part` None: read unconditionally."""

    part: str | None
    overrides: tuple[ConfigOverride, ...]


def override_groups(spec: DescriptorSpec) -> list[OverrideGroup]:
    parts: dict[str | None, list[ConfigOverride]] = {None: []}
    for o in spec.overrides:
        path = o.block_config_attr.split(".")
        part = ".".join(path[:2]) if len(path) > 2 else None
        parts.setdefault(part, []).append(o)
    return [OverrideGroup(p, tuple(os)) for p, os in parts.items()]


# -- imports --------------------------------------------------------------------------------------
def _runtime_module(submodule: str) -> str:
    return f"{RUNTIME}.{submodule}"


@dataclass(frozen=True)
class Target:
    """What differs between the APIs a descriptor is rendered for. The default is this project's
    runtime; generator/modelopt/ builds Model Optimizer's (its module names, its imports, the
    command that regenerates the file and the template variables of its additions)."""

    module_for: Callable[[str], str] = _runtime_module  # our runtime's submodule -> module
    third_party: dict[str, frozenset[str]] = field(default_factory=dict)  # more `from m import`s
    first_party: dict[str, frozenset[str]] = field(default_factory=dict)  # submodule -> names
    stdlib: tuple[str, ...] = ()  # more import lines before `from typing import Any`
    command: str | None = None
    # runtime names the module defines itself instead of importing them ("rebuild_buffers",
    # "move_to_sole_subblock", no-op stand-ins such as "PassResidual")
    inline: frozenset[str] = frozenset()
    template_vars: dict[str, Any] = field(default_factory=dict)


def sort_names(names) -> list[str]:
    """The names of one `from m import ...` line, in isort's order (constants, classes, rest)."""

    def key(n: str):
        rank = 0 if n.isupper() else 1 if n[:1].isupper() else 2
        return rank, n.lower()

    return sorted(set(names), key=key)


def import_lines(spec: DescriptorSpec, target: Target = Target()) -> list[str]:
    module_for = target.module_for
    third: dict[str, set[str]] = {"torch": {"nn"}}
    refs = referenced_classes(spec)
    for ref in refs:
        if not is_remote(ref):
            third.setdefault(ref.module, set()).add(ref.name)
    imported = [n for names in third.values() for n in names if n != "nn"]
    clashes = sorted(
        {n for n in imported if n in TEMPLATE_NAMES or hasattr(builtins, n)}
        | {n for n in imported if imported.count(n) > 1}
    )
    if spec.class_name in set(imported) | TEMPLATE_NAMES or clashes:
        raise PuzzleGenError(
            f"refusing to import {', '.join(clashes) or spec.class_name}: the name would shadow "
            "one the descriptor uses"
        )
    for module, names in target.third_party.items():
        third.setdefault(module, set()).update(names)
    no_op = no_op_names(spec) - target.inline
    first: dict[str, set[str]] = {
        module_for("block_config"): {"BlockConfig"},
        module_for("model_descriptor"): {"ModelDescriptor", "ModelDescriptorFactory"},
    }
    if no_op:
        first[module_for("puzzformer.no_op")] = no_op
    if spec.dummy_block.returns_tuple or spec.dummy_block.attributes:
        first[module_for("utils.dummy_modules")] = {"DummyBlock"}
    if spec.rebuilt_buffers and "rebuild_buffers" not in target.inline:
        first[module_for("buffers")] = {"rebuild_buffers"}
    if spec.predicates.followers and "move_to_sole_subblock" not in target.inline:
        first[module_for("model_descriptor.weight_groups")] = {"move_to_sole_subblock"}
    if spec.predicates.by_kind and "group_by_layer_kind" not in target.inline:
        first[module_for("model_descriptor.kind_groups")] = {"group_by_layer_kind"}
    for submodule, names in target.first_party.items():
        first.setdefault(module_for(submodule), set()).update(names)
    for module, names in list(third.items()) + list(first.items()):
        if not is_dotted_path(module.lstrip(".")) or not all(is_identifier(n) for n in names):
            raise PuzzleGenError(f"refusing to import {sorted(names)} from {module!r}")
    lines = ["import re"]
    if any(is_remote(c) for c in refs):
        lines.append("import sys")
    lines += [*target.stdlib, "from typing import Any", ""]
    for group in (third, first):
        for module in sorted(group):
            lines.append(f"from {module} import {', '.join(sort_names(group[module]))}")
        lines.append("")
    return lines[:-1]


def layer_ranges(indices) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"; a stride (2, 5, 8, 11) -> "2, 5, ..., 11 (every 3rd)"."""
    indices = list(indices)
    if len(indices) > 4:
        step = indices[1] - indices[0]
        if step > 1 and all(b - a == step for a, b in zip(indices, indices[1:])):
            return f"{indices[0]}, {indices[1]}, ..., {indices[-1]} (every {_nth(step)})"
    out, run = [], []
    for i in indices + [None]:
        if run and (i is None or i != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
            run = []
        if i is not None:
            run.append(i)
    return ", ".join(out)


def _nth(n: int) -> str:
    return f"{n}{'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def layer_type(spec: DescriptorSpec) -> str:
    """The annotation of `decoder_layer`: its class when the stack has one, else nn.Module."""
    classes = spec.decoder_layer_classes
    if len(classes) == 1 and not is_remote(classes[0]):
        return classes[0].name
    return "nn.Module"
