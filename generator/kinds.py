"""Layer kinds: the decoder layers of a stack, grouped by what they are built of.

A kind is a layer class together with the names of its children and the classes of those that
hold matrices (a norm that is an Identity in one layer, ModernBERT-decoder's, does not make
another kind). Llama
has one kind; Qwen3-Next two (`linear_attn` or `self_attn` beside an MoE block), DeepSeek-V3 two
(a dense `mlp` in the first layers, experts after), Nemotron-H four (one class whose `mixer` is
a Mamba mixer, an attention, an MLP or experts), Jamba and OLMo-hybrid several classes. Each kind
is analysed once, on its first layer; which layers have it comes from building the config, so it
is whatever the modeling code reads from the config's own per-layer fields.

A generated descriptor receives a built layer (`attn_no_op_post_init(decoder_layer)`), not its
index, so every kind also gets a *selector*: tests on the layer object that hold for its layers
and for no layer of another kind (its class, a child it has or lacks, the class of a child),
checked here against every probed layer.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from torch import nn

from .errors import InferenceError, StaticGap
from .spec import ClassRef, KindTest, is_identifier


def ref(cls: type) -> ClassRef:
    return ClassRef(cls.__module__, cls.__name__)


@dataclass
class KindGroup:
    """Layers of one kind in a built stack (or, for a kind only other configs build, the layer
    of such a config: `layers` is then empty and `built_by` says how it is built)."""

    layer_class: type
    children: tuple[tuple[str, type | None], ...]  # (name, class of a child with matrices)
    layers: list[int]
    modules: list[nn.Module] = field(default_factory=list)  # the layer objects
    built_by: str = ""  # `layer_types[i] = 'conv'`: how other configs build this kind
    tiny_changes: dict = field(default_factory=dict)  # the tiny config change that builds it
    # the same kind built by later values, each a callable giving its group (or None): tried in
    # turn where this value's layers cannot be analysed (LFM2 under transformers 5.14 takes
    # 'sliding_attention' and builds its convolution layer, whose forward then wants a window)
    alternatives: list = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.children)


def _has_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def signature(layer: nn.Module) -> tuple:
    return (
        type(layer),
        tuple((n, type(c) if _has_matrix(c) else None) for n, c in layer.named_children()),
    )


def group_layers(stack: nn.ModuleList) -> list[KindGroup]:
    """The kinds of `stack`, in order of their first layer."""
    groups: dict[tuple, KindGroup] = {}
    for i, layer in enumerate(stack):
        sig = signature(layer)
        if sig not in groups:
            groups[sig] = KindGroup(sig[0], sig[1], [])
        groups[sig].layers.append(i)
        groups[sig].modules.append(layer)
    return list(groups.values())


# Per-layer type lists and the values transformers allows in them (its own vocabulary, checked
# by PreTrainedConfig.validate_layer_type): each value another config may use is tried on the
# last layer, and a layer kind that the probed config does not build is analysed too (LFM2's
# default config has only attention layers; its checkpoints have short convolutions).
def _layer_type_vocabularies() -> dict[str, tuple[str, ...]]:
    from transformers import configuration_utils as cu

    # transformers before 5.15 (Model Optimizer's range) keeps one list for both
    attention = getattr(cu, "ALLOWED_ATTN_LAYER_TYPES", getattr(cu, "ALLOWED_LAYER_TYPES", ()))
    return {
        "layer_types": tuple(attention),
        "mlp_layer_types": tuple(getattr(cu, "ALLOWED_MLP_LAYER_TYPES", ())),
    }


def other_config_kinds(probe, stack_path: str, groups: list[KindGroup], build) -> list[KindGroup]:
    """Layer kinds that configs of the same type build from another per-layer type value: each
    allowed value the probed config lacks is set on the last layer of the tiny config (or is
    there already: GraniteMoE-Hybrid's and Bamba's default stacks are all Mamba, their tiny
    configs end in an attention layer, as their checkpoints have attention layers); a new kind
    it builds is also built at the probed config's size (its last layer changed the same way),
    where it is analysed. A type list derived from other fields (Bamba's `layer_types`, from
    `attn_layer_indices`) cannot be set: the kind is then analysed on the tiny layer (the
    analysis reads structure only). `build(config)` builds a model on the meta device."""
    known = {(g.layer_class, g.children) for g in groups}
    found: dict[tuple, KindGroup] = {}  # by signature
    tiny_text = probe.tiny_config().get_text_config()
    full_text = probe.config.get_text_config()
    for name, vocabulary in _layer_type_vocabularies().items():
        tiny_values = getattr(tiny_text, name, None)
        full_values = getattr(full_text, name, None)
        if not (_strings(tiny_values) and _strings(full_values)):
            continue
        # the tiny config's own values too: transformers before 5.15 has no vocabulary (Model
        # Optimizer's range), and a tiny config that ends in another kind names that kind
        for value in dict.fromkeys((*vocabulary, *tiny_values)):
            if value in full_values:
                continue  # the probed stack has it: a kind already grouped
            if value in tiny_values:  # the tiny config builds it already
                changes, position = {}, list(tiny_values).index(value)
            else:
                changes, position = {name: list(tiny_values[:-1]) + [value]}, -1
            try:
                tiny_stack = build(probe.tiny_config(**changes)).get_submodule(stack_path)
            except StaticGap:
                raise  # a static build that cannot tell (generator/static_build.py)
            except Exception:
                continue  # a value this model does not take
            tiny_layer = tiny_stack[position % len(tiny_stack)]
            sig = signature(tiny_layer)
            make = functools.partial(
                _hidden_group, probe, stack_path, name, full_values, value, changes, tiny_layer, build
            )
            if sig in found:
                found[sig].alternatives.append(make)
                continue
            if sig in known:
                continue
            group = make()
            if group is not None:
                found[sig] = group
    return list(found.values())


def _hidden_group(probe, stack_path, name, full_values, value, changes, tiny_layer, build):
    """The group of a kind that `name`[i] = `value` builds (`tiny_layer` in the tiny stack),
    analysed on a layer at the probed config's size where the field can be set there; None
    where that layer is of another kind."""
    sig = signature(tiny_layer)
    layer = _full_size_layer(probe, stack_path, name, full_values, value, build)
    if layer is None:
        layer = tiny_layer
    elif signature(layer) != sig:
        return None
    return KindGroup(sig[0], sig[1], [], [layer], f"{name}[i] = {value!r}", dict(changes))


def next_alternative(group: KindGroup) -> KindGroup | None:
    """The first of `group`'s alternatives that builds its kind (carrying the rest), or None."""
    rest = list(group.alternatives)
    while rest:
        candidate = rest.pop(0)()
        if candidate is not None:
            candidate.alternatives = rest
            return candidate
    return None


def _full_size_layer(probe, stack_path, name, values, value, build) -> nn.Module | None:
    """The last layer of the probed config with its last type in `name` (`values`) set to
    `value`, or None where the field cannot be set."""
    full = copy.deepcopy(probe.config)
    if not settable(full.get_text_config(), name, list(values[:-1]) + [value]):
        return None  # a list derived from other fields (a property)
    try:
        full_stack = build(full).get_submodule(stack_path)
    except StaticGap:
        raise
    except Exception:
        return None
    return full_stack[len(full_stack) - 1]


def settable(config, name: str, value) -> bool:
    """Set config.<name> = value; False where the config refuses it (FalconH1Config maps
    `layer_types` onto a read-only property computed from other fields: such a field describes
    the stack but is not a choice one layer can make)."""
    try:
        setattr(config, name, value)
    except (AttributeError, TypeError):  # a property without a setter; a refused value
        return False
    return True


def _strings(values) -> bool:
    return (
        isinstance(values, (list, tuple))
        and bool(values)
        and all(isinstance(v, str) for v in values)
    )


def label(group: KindGroup, groups: list[KindGroup]) -> str:
    """A reviewer's name for the kind: its class, and the children that set it apart
    (`RecurrentGemmaDecoderLayer with temporal_block: RecurrentGemmaAttention`,
    `RwkvBlock without pre_ln`)."""
    name = group.layer_class.__name__
    if len(groups) == 1:
        return name
    common = set.intersection(*(set(g.children) for g in groups))
    own = [f"{n}: {c.__name__}" if c else n for n, c in group.children if (n, c) not in common]
    if own:
        return f"{name} with {', '.join(own)}"
    lacks = sorted({n for g in groups for n, _ in g.children} - set(group.names))
    if lacks and all(g.layer_class is group.layer_class for g in groups):
        return f"{name} without {', '.join(lacks)}"
    return name


_MISSING = object()


def holds(test: KindTest, layer: nn.Module, classes: dict[ClassRef, type]) -> bool:
    """Whether a built `layer` passes one selector test (`classes`: the imported classes of the
    ClassRefs the test names)."""
    if test.value is not None:
        return getattr(layer, test.child, _MISSING) == test.value
    if test.child is None:
        return isinstance(layer, classes[test.cls])
    if test.cls is None:
        return hasattr(layer, test.child) != test.negate
    child = getattr(layer, test.child, None)
    return child is not None and isinstance(child, classes[test.cls])


def _candidates(group: KindGroup, groups: list[KindGroup], first: nn.Module):
    """Tests that hold for `group`, most readable first. The no-ops replace children, so tests
    that a replacement leaves true (the class, which children exist, a plain attribute such as
    Nemotron-H's `block_type`) come before a child's class."""
    yield KindTest(None, ref(group.layer_class)), {ref(group.layer_class): group.layer_class}
    for name, _ in group.children:
        yield KindTest(name, None), {}
    for other in groups:
        for name, _ in other.children:
            if name not in group.names:
                yield KindTest(name, None, negate=True), {}
    for name, value in sorted(vars(first).items()):
        if name.startswith("_") or not is_identifier(name):
            continue
        if isinstance(value, (bool, int)) or (isinstance(value, str) and value.isprintable()):
            yield KindTest(name, None, value=value), {}
    for name, cls in group.children:
        if cls is not None:
            yield KindTest(name, ref(cls)), {ref(cls): cls}


def selectors(groups: list[KindGroup]) -> list[tuple[KindTest, ...]]:
    """For each kind, tests that all its layers pass and every layer of every other kind fails
    (one test at least): none are needed when the stack has one kind."""
    if len(groups) == 1:
        return [()]
    out = []
    for group in groups:
        mine = group.modules
        chosen: list[KindTest] = []
        classes: dict[ClassRef, type] = {}
        for other in groups:
            if other is group:
                continue
            theirs = other.modules
            if chosen and not all(
                all(holds(t, layer, classes) for t in chosen) for layer in theirs
            ):
                continue  # the tests so far already reject this kind
            for test, more in _candidates(group, groups, mine[0]):
                known = {**classes, **more}
                if all(holds(test, layer, known) for layer in mine) and not any(
                    holds(test, layer, known) for layer in theirs
                ):
                    chosen.append(test)
                    classes = known
                    break
            else:
                raise InferenceError(
                    "how to tell the layer kinds apart",
                    f"no test on the layer object tells layers {group.layers or group.built_by}"
                    f" from layers {other.layers or other.built_by} (same class and children)",
                )
        out.append(tuple(chosen))
    return out
