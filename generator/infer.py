"""Stage 4: combine static analysis and the probe into a DescriptorSpec.

Static findings come first; the probe confirms each of them and generation stops, naming both
findings, when they disagree. Every fact records its evidence.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from puzzletron_runtime.buffers import empty_buffers, init_owners, rebuild_buffers

from . import __version__, kinds, predicates
from .analysis import model_structure
from .analysis.source_index import SourceIndex
from .checkpoint import check_checkpoint, origin_fields
from .checkpoint_renames import prefix_renames
from .descriptor_view import layer_ranges
from .errors import InferenceError, ProbeMismatch
from .layer_kind import _carried_facts, _layer_kind
from .layer_weights import has_params, weight_modules, with_disk_children
from .probe import Probe, build_model
from .static_returns import carried_arguments
from .source import ModelSource, resolve
from .spec import (
    CarriedArgument,
    ClassRef,
    ConfigOverride,
    ConfigVariant,
    DescriptorSpec,
    DummyBlock,
    Fact,
    LayerKind,
    RebuiltBuffers,
    BLOCK_CONFIG_ATTRS,
    is_identifier,
)

_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "Model")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass
class _Context:
    source: ModelSource
    index: SourceIndex
    probe: Probe
    facts: list[Fact]
    scope: str = ""  # "<layer kind>: " while a kind of a several-kind stack is analysed

    def fact(self, name: str, value: object, evidence) -> None:
        self.facts.append(Fact(self.scope + name, str(value), tuple(evidence)))


def infer(model_type: str | ModelSource) -> DescriptorSpec:
    """Infer the descriptor of `model_type`, or of a source from `source.resolve_target` (a
    checkpoint directory); raises PuzzleGenError subclasses on failure."""
    import transformers

    source = model_type if isinstance(model_type, ModelSource) else resolve(model_type)
    model_type = source.model_type
    if source.static is not None:  # parsed code, never imported: its static build
        ctx = _Context(source, source.static.index, source.static.probe(source), [])
    else:
        ctx = _Context(source, SourceIndex(display=source.relpath), Probe(source), [])
    probe = ctx.probe

    stack_path, stack_at, layer_classes = _layer_stack(ctx)
    stack = probe.module(stack_path)
    groups = kinds.group_layers(stack)
    tiny = _tiny_model(ctx)
    tiny_groups = kinds.group_layers(tiny.get_submodule(stack_path))

    owner_path = stack_path.rpartition(".")[0]
    owner = probe.module(owner_path)
    optional = model_structure.optional_modules(ctx.index, type(owner), owner)
    loop = model_structure.analyze_loop(
        ctx.index,
        type(owner),
        stack_path.rpartition(".")[2],
        {n for n, _ in owner.named_children()},
        frozenset(optional),
    )
    final_norm = _join(owner_path, loop.final_norm) if loop.final_norm else None
    ctx.fact(
        "final norm",
        final_norm,
        (
            loop.evidence[-1:]
            if final_norm
            else ["nothing is called on the hidden states after the loop"]
        ),
    )
    dummy = _dummy_block(ctx, loop, [stack[g.layers[0]] for g in groups])

    input_embedding = probe.input_embedding()
    output_embedding = probe.output_embedding()
    ctx.fact("input embedding", input_embedding, ["probe: get_input_embeddings()"])
    ctx.fact("output embedding", output_embedding, ["probe: get_output_embeddings()"])
    tied_how = "shares the embedding weight" if probe.tied() else "has its own weight"
    ctx.fact("tied embeddings", probe.tied(), [f"probe: the default config's LM head {tied_how}"])

    hidden = kinds.other_config_kinds(
        probe, stack_path, groups, lambda config: build_model(source.causal_lm_cls, config)
    )
    groups = groups + hidden
    every_child = {n for g in groups for n in g.names}
    analysed: list[tuple[kinds.KindGroup, LayerKind]] = []
    overrides: dict[tuple[str, str], ConfigOverride] = {}
    variants: list[ConfigVariant] = []
    pending = list(groups)
    while pending:
        group = pending.pop(0)
        label = kinds.label(group, groups)
        ctx.scope = f"{label}: " if len(groups) > 1 else ""
        ctx.probe = probe.variant(group.tiny_changes) if group.built_by else probe
        try:
            if group.built_by:
                built = kinds.group_layers(ctx.probe.tiny_model().get_submodule(stack_path))
                tiny_kind = _tiny_layer(group, built, label)
            else:
                tiny_kind = _tiny_layer(group, tiny_groups, label)
            kind, found, kind_variants = _layer_kind(
                ctx, group, label, (), stack_path, tiny_kind, every_child
            )
        except InferenceError as exc:
            if not group.built_by:
                raise
            # a value the model takes but does not build a layer of its own kind from (a
            # Qwen3-Next layer typed "conv" has no token mixer at all): not described
            ctx.scope = ""
            ctx.fact(f"layers built by {group.built_by}", "not a layer kind", [str(exc)])
            alternative = kinds.next_alternative(group)
            if alternative is not None:  # another value that builds the same kind
                pending.insert(0, alternative)
            continue
        analysed.append((group, kind))
        variants.extend(v for v in kind_variants if v not in variants)
        for o in found:
            overrides.setdefault((o.block_config_attr, o.config_field), o)
    groups = [g for g, _ in analysed]
    layer_kinds = [
        dataclasses.replace(kind, selector=selector, label=kinds.label(group, groups))
        for (group, kind), selector in zip(analysed, kinds.selectors(groups))
    ]
    ctx.scope = ""
    ctx.probe = probe
    _check_overrides(overrides.values())
    order = list(BLOCK_CONFIG_ATTRS)
    overrides = dict(sorted(overrides.items(), key=lambda kv: order.index(kv[0][0])))
    layer_kinds = [  # each kind's overrides as the spec lists them (the first kind's evidence)
        dataclasses.replace(
            k,
            overrides=tuple(overrides[(o.block_config_attr, o.config_field)] for o in k.overrides),
        )
        for k in layer_kinds
    ]
    if len(groups) > 1:
        ctx.fact(
            "layer kinds",
            "; ".join(
                f"{k.label}: "
                + (f"layers {layer_ranges(k.layers)}" if k.layers else f"built by {k.built_by}")
                for k in layer_kinds
            ),
            [f"probe: the classes and children of every layer in {stack_path}"],
        )

    def weighted(names: list[str]) -> list[str]:
        # a module other configs add is grouped by where it is called (it is absent here)
        return [
            _join(owner_path, n)
            for n in names
            if n in optional or has_params(probe.module(_join(owner_path, n)))
        ]

    embeddings = _unique([input_embedding] + weighted(loop.before_loop))
    lm_head = _unique(
        ([final_norm] if final_norm else []) + weighted(loop.after_loop) + [output_embedding]
    )
    # weighted modules outside the language model: a modality encoder (a vision tower, its
    # projector) that a text-only forward never runs gets a group of its own; one that runs
    # beside the base model (ModernBERT-decoder's prediction head before its decoder) runs on
    # the base model's output, like the LM head
    encoders: list[str] = []
    for path, child in _outside_language_model(probe.model, owner_path):
        if any(p == path or p.startswith(path + ".") for p in embeddings + lm_head):
            continue
        if not has_params(child):
            continue
        # asked only here: a static build (parsed code) cannot run a forward to tell
        if path not in probe.called_modules(path):
            encoders.append(path)
            ctx.fact(
                f"{path} (outside the language model)",
                "grouped as vision_encoding",
                [
                    f"probe: {type(child).__name__} beside {owner_path}; a text-only forward of "
                    "a tiny model never calls it (an encoder of another modality)"
                ],
            )
        elif "." not in path:
            lm_head.insert(len(lm_head) - 1, path)
            ctx.fact(
                f"{path} (beside the base model)",
                "grouped with lm_head",
                [
                    f"probe: {type(child).__name__} outside {stack_path.split('.')[0]}, which "
                    "holds the embeddings and layers: it runs on the base model's output"
                ],
            )
        else:
            raise InferenceError(
                f"the weight group of {path}",
                f"{type(child).__name__} sits beside the language model ({owner_path}) and the "
                "text forward calls it, neither before the layer loop nor as the head",
            )
    for name in optional:
        group = (
            "embeddings"
            if name in loop.before_loop
            else "lm_head" if name in loop.after_loop else None
        )
        if group is None:
            continue
        variants.append(ConfigVariant(_join(owner_path, name), group))
        ctx.fact(
            f"module other configs add: {_join(owner_path, name)}",
            f"grouped with {group}",
            [
                optional[name],
                f"called {'before' if group == 'embeddings' else 'after'} the layer loop",
            ],
        )
    attention_weights, ffn_weights, tensors, followers, by_kind, kind_children = weight_modules(
        layer_kinds, [g.modules[0] for g in groups]
    )
    preds = predicates.build(
        embeddings,
        lm_head,
        stack_path,
        attention_weights,
        ffn_weights,
        tensors,
        followers,
        encoders,
    )
    if followers:
        ctx.fact(
            "weight group of " + ", ".join(followers),
            "the subblock its layer has",
            [
                f"{', '.join(followers)} precede the only subblock of every layer kind that has "
                "them, attention in some and FFN in others: get_weight_groups moves them from "
                "the attention group to the FFN group of layers without attention"
            ],
        )
    if by_kind:
        ctx.fact(
            "weight group of " + ", ".join(by_kind),
            "the subblock its layer's kind puts it in",
            [
                f"{k.label}: {', '.join(n for n in by_kind if n in k.ffn) or 'none'} with the "
                f"FFN, {', '.join(n for n in by_kind if n in k.attention) or 'none'} with the "
                "attention"
                for k in kind_children
            ]
            + [
                "get_weight_groups gets names and a layer count, no config: it tells a layer's "
                "kind from the children its tensors are under"
            ],
        )
    predicates.validate(preds, probe.state_keys, probe.num_layers, "the default model's state dict")
    tiny_layers = int(tiny.config.get_text_config().num_hidden_layers)
    predicates.validate(preds, tiny.state_dict().keys(), tiny_layers, "the tiny model's state dict")
    on_disk = {**_untied_checkpoint_names(probe, tiny), **probe.checkpoint_names(tiny)}
    preds, renamed = predicates.with_checkpoint_names(preds, on_disk, tiny_layers)
    if by_kind:
        by_kind, kind_children = with_disk_children(
            tuple(by_kind), kind_children, on_disk, preds.layer_prefix_regex()
        )
        preds = dataclasses.replace(preds, by_kind=by_kind, kind_children=kind_children)
    if renamed:
        ctx.fact("checkpoint names", "grouped with the modules they load into", renamed)
    renames = prefix_renames(on_disk)
    predicates.validate(preds, on_disk, tiny_layers, "the names save_pretrained writes")
    if source.checkpoint is not None:
        check_checkpoint(source.checkpoint, preds, probe)

    buffers = probe.static_buffers(ctx) if probe.is_static else _rebuilt_buffers(ctx, tiny)
    causal = source.causal_lm_cls
    spec = DescriptorSpec(
        model_type=model_type,
        package=_package_name(model_type),
        class_name=_class_name(causal.__name__),
        generator_version=__version__,
        transformers_version=transformers.__version__,
        modeling_module=source.modeling_module,
        config_class=ClassRef(source.config_cls.__module__, source.config_cls.__name__),
        causal_lm_class=ClassRef(causal.__module__, causal.__name__),
        decoder_layer_classes=tuple(kinds.ref(c) for c in layer_classes),
        layer_stack=stack_path,
        layer_stack_at=stack_at,
        num_layers_field="num_hidden_layers",
        text_config_attr=probe.text_config_attr,
        input_embedding=input_embedding,
        output_embedding=output_embedding,
        final_norm=final_norm,
        final_norm_at=loop.final_norm_at if final_norm else None,
        tied_embeddings=probe.tied(),
        kinds=tuple(layer_kinds),
        overrides=tuple(overrides.values()),
        rebuilt_buffers=tuple(buffers),
        dummy_block=dummy,
        predicates=preds,
        facts=tuple(ctx.facts),
        config_variants=tuple(variants),
        checkpoint_renames=renames,
        **origin_fields(source),
    )
    return probe.restate(spec)


# -- layer stack ------------------------------------------------------------------------------
def _other_layer_unit(probe, static, n: int) -> None:
    """A stack the modeling code sizes by another config field than num_hidden_layers, which
    is a multiple of its length (LongCat-Flash: `range(config.num_layers)`, num_hidden_layers =
    2 x num_layers, two attention sublayers per layer): the config counts sublayers, and a
    descriptor's blocks (one per num_hidden_layers) cannot be the stack's layers."""
    for path, finding in static:
        try:
            stack = probe.module(path)
        except AttributeError:
            continue
        size = len(stack) if isinstance(stack, nn.ModuleList) else 0
        if 0 < size < n and n % size == 0 and "num_hidden_layers" not in finding.count:
            raise InferenceError(
                "the layer stack",
                f"{path} holds {size} layers, counted by `{finding.count}`, but "
                f"num_hidden_layers is {n} = {n // size} x {size}: the config counts another "
                "unit (sublayers, repeated runs), so a block per num_hidden_layers is not a "
                "layer of the stack",
                [finding.where],
            )


def _layer_stack(ctx: _Context) -> tuple[str, list[type]]:
    probe = ctx.probe
    static = []

    def visit(path: str, module: nn.Module, depth: int) -> None:
        if depth > 5 or not type(module).__module__.startswith("transformers"):
            return
        try:
            found = model_structure.find_stacks(ctx.index, type(module))
        except InferenceError:
            found = []
        static.extend((_join(path, s.attr), s) for s in found)
        for name, child in module.named_children():
            if not isinstance(child, nn.ModuleList):
                visit(_join(path, name), child, depth + 1)

    visit("", probe.model, 0)
    n = probe.num_layers
    probed = [p for p, ml in probe.module_lists() if len(ml) == n]
    matching = []
    for path, finding in static:
        try:
            ml = probe.module(path)
        except AttributeError:
            raise ProbeMismatch(
                "the layer stack", f"a ModuleList at {path} ({finding.where})", "no such module"
            ) from None
        if isinstance(ml, nn.ModuleList) and len(ml) == n:
            matching.append((path, finding))
    if not matching:
        _other_layer_unit(probe, static, n)
        statics = ", ".join(f"{p} ({f.where})" for p, f in static) or "no ModuleList"
        raise ProbeMismatch(
            "the layer stack",
            statics,
            f"ModuleLists of num_hidden_layers={n} at: {', '.join(probed) or 'none'}",
        )
    if len(matching) > 1:
        preferred = [(p, f) for p, f in matching if "num_hidden_layers" in f.count]
        if len(preferred) == 1:
            matching = preferred
        else:
            raise InferenceError(
                "the layer stack",
                "several ModuleLists hold num_hidden_layers modules",
                [f"{p} ({f.where})" for p, f in matching],
            )
    path, finding = matching[0]
    stack = probe.module(path)
    classes: list[type] = []
    for layer in stack:
        if type(layer) not in classes:
            classes.append(type(layer))
    if finding.element_classes and {c.__name__ for c in classes} != set(finding.element_classes):
        raise ProbeMismatch(
            "the decoder layer class",
            f"{', '.join(finding.element_classes)} ({finding.where})",
            ", ".join(c.__name__ for c in classes),
        )
    ctx.fact(
        "layer stack",
        path,
        [f"{finding.where} `{finding.code}`", f"probe: ModuleList of {n} = num_hidden_layers"],
    )
    ctx.fact(
        "decoder layer class",
        ", ".join(c.__name__ for c in classes),
        [f"probe: type of every module in {path}"],
    )
    return path, finding.where, classes


def _outside_language_model(model: nn.Module, owner_path: str):
    """(path, module) of every child of the modules on the path from the causal LM to the
    owner of the layer stack that is not itself on that path: the head beside the base model,
    a vision tower and projector beside the language model."""
    parts = owner_path.split(".") if owner_path else []
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = model.get_submodule(parent) if parent else model
        for name, child in module.named_children():
            if name != parts[depth]:
                yield _join(parent, name), child


# -- tiny models --------------------------------------------------------------------------------
def _untied_checkpoint_names(probe, tiny: nn.Module) -> dict[str, str]:
    """A tied model's checkpoint holds no head tensor: the names an untied model of the type
    writes, so that the head's name on disk is known too (transformers 5.14 writes Gemma 3's as
    `language_model.lm_head.weight`). {} where the model is untied or cannot be."""
    if probe.is_static or not _ties(tiny):
        return {}
    try:
        untied = probe.tiny_model(probe.tiny_config(tie_word_embeddings=False))
    except Exception:  # a config that only ties
        return {}
    return {} if _ties(untied) else probe.checkpoint_names(untied)


def _ties(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _tiny_model(ctx: _Context) -> nn.Module:
    try:
        return ctx.probe.tiny_model()
    except InferenceError:
        raise
    except Exception as exc:
        raise InferenceError(
            "a traced forward of a tiny model",
            f"the tiny config does not build: {type(exc).__name__}: {exc}",
        ) from None


def _tiny_layer(
    group: kinds.KindGroup, tiny_groups: list[kinds.KindGroup], label: str
) -> kinds.KindGroup:
    """The layers of the tiny model with the kind of `group` (the tiny model is where the kind
    is traced, on its first such layer, and its overrides are proven, on all of them)."""
    for g in tiny_groups:
        if (g.layer_class, g.children) == (group.layer_class, group.children):
            return g
    raise InferenceError(
        "a tiny model with every layer kind",
        f"the tiny config builds no layer like layers {layer_ranges(group.layers)} of the probed "
        f"config ({label}); the tiny config's layers are "
        + "; ".join(f"{layer_ranges(g.layers)}: {', '.join(g.names)}" for g in tiny_groups),
    )


def _check_overrides(overrides) -> None:
    """One config field per block-config size: two sizes written to one field would race. One
    exception: a field that a dense kind reads as its width and an MoE kind as its experts'
    (Jamba's intermediate_size) is written from ffn.intermediate_size and, when the block config
    has experts, from ffn.moe: the optional part is rendered last, so it decides."""
    fields: dict[str, set[str]] = {}
    for o in overrides:
        fields.setdefault(o.config_field, set()).add(o.block_config_attr)
    for field, sizes in fields.items():
        plain = {s for s in sizes if s.count(".") == 1}
        optional = sizes - plain
        if (
            len(plain) > 1
            or len({s.rsplit(".", 1)[0] for s in optional}) > 1
            or (len(optional) > 1)
        ):
            raise InferenceError(
                f"the override of config.{field}",
                f"several block-config sizes map to it ({', '.join(sorted(sizes))})",
            )


# -- model loop ---------------------------------------------------------------------------------
def _dummy_block(ctx, loop, layers: list[nn.Module]) -> DummyBlock:
    """What the loop reads from a layer; an attribute counts when every layer kind has it."""
    attrs = []
    for name in loop.layer_attributes:
        values = [getattr(layer, name, None) for layer in layers]
        if all(v is not None and not callable(v) and not isinstance(v, nn.Module) for v in values):
            attrs.append(name)
    evidence = list(loop.evidence[:2])
    ctx.fact(
        "model loop expects",
        (
            (f"a tuple of {loop.tuple_size}" if loop.tuple_size > 1 else "a tuple")
            if loop.returns_tuple
            else "a tensor"
        )
        + (f"; reads {', '.join(attrs)}" if attrs else ""),
        evidence,
    )
    carried: tuple[CarriedArgument, ...] = ()
    if loop.returns_tuple and loop.tuple_size > 1:
        # what every layer kind hands back, the dummy hands back: the loop threads it on
        found = [carried_arguments(layer, ctx.index) for layer in layers]
        common = {i: v for i, v in found[0].items() if all(f.get(i) == v for f in found[1:])}
        classes = sorted({type(layer).__name__ for layer in layers})
        carried = _carried_facts(
            ctx,
            "each layer",
            " and ".join(f"{c}.forward" for c in classes),
            common,
            loop.tuple_size,
            "",
        )
    return DummyBlock(loop.returns_tuple, tuple(attrs), tuple(evidence), loop.tuple_size, carried)


# -- buffers ------------------------------------------------------------------------------------
def _rebuilt_buffers(ctx: _Context, tiny: nn.Module) -> list[RebuiltBuffers]:
    """The buffers a meta build leaves empty, confirmed to come back equal through the runtime's
    rebuild_buffers: a tiny model built on the meta device, given the weights of the same model
    built normally, must end with every buffer equal (torch.equal, same dtype) to the normal one."""
    meta = build_model(type(tiny), tiny.config, "meta")
    meta.load_state_dict(tiny.state_dict(), strict=False, assign=True)
    empty = empty_buffers(meta)
    fact = "how to rebuild the buffers a meta build leaves empty"
    try:
        rebuild_buffers(meta, "cpu")
    except Exception as exc:
        raise InferenceError(fact, f"rebuild_buffers fails: {type(exc).__name__}: {exc}") from None
    want = dict(tiny.named_buffers())
    got = dict(meta.named_buffers())
    for name, ref in want.items():
        b = got.get(name)
        if b is None or b.dtype != ref.dtype or b.shape != ref.shape or not torch.equal(b, ref):
            raise InferenceError(
                f"how to rebuild buffer {name}",
                "the owning model's _init_weights does not reproduce the value the model "
                "computes when built normally",
            )
    owners = init_owners(meta)
    out = []
    for path, names in empty.items():
        init_class = type(owners[path]).__name__
        evidence = (
            f"probe: {', '.join(names)} of {type(meta.get_submodule(path)).__name__} stay on the "
            "meta device after loading the state dict",
            f"probe: {init_class}._init_weights rebuilds them equal to a normal build",
        )
        out.append(RebuiltBuffers(path, tuple(names), init_class, evidence))
        ctx.fact(f"rebuilt buffers of {path or 'the model'}", ", ".join(names), evidence)
    return out


# -- names ----------------------------------------------------------------------------------------
def _package_name(model_type: str) -> str:
    name = re.sub(r"\W", "_", model_type)
    if not is_identifier(name):
        raise InferenceError("the package name", f"{model_type!r} does not map to an identifier")
    return name


def _class_name(causal_name: str) -> str:
    stem = causal_name
    for suffix in _CLASS_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    name = f"{stem}ModelDescriptor"
    if not is_identifier(name):
        raise InferenceError("the descriptor class name", f"{name!r} is not an identifier")
    return name


def _unique(items) -> list:
    return list(dict.fromkeys(items))
