"""The converter: `create_block_configs_from_main_config(config)`, one block config per layer,
following the config's own per-layer pattern.

The rule: the converter asks the modeling code which kind each layer is, by building the model
from the config it is given on the meta device (no memory, no weights) and testing each built
layer with the kind selectors the descriptor's no-ops use. A pattern field (`layer_types`,
`hybrid_override_pattern`, `mlp_only_layers`, `first_k_dense_replace`, `moe_layer_freq`, ...) is
then read exactly where and how the modeling code reads it, including defaults and derived
patterns the config computes, for any config of the type, and no per-type parser is written. A
stack of one kind needs no build: every layer is that kind.

Each kind's sizes are read from the config fields its own overrides write back (so its block
configs, fed back through `block_config_to_layer_overrides`, rebuild the model the config
describes), and a size Model Optimizer's BlockConfig requires that no override of the kind sets
comes from a rule measured on tiny and default-size models (`size_probe.SizeProbe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..descriptor_view import sort_names
from ..errors import PuzzleGenError
from ..heterogeneous import config_value
from ..spec import DescriptorSpec, is_dotted_path, is_identifier
from .kind_reads import kind_condition, kind_overrides, kind_where, selector_classes
from .names import MODELOPT, PACKAGE, PUZZLETRON, module_for, names_for
from .size_probe import SizeProbe


@dataclass(frozen=True)
class ConverterField:
    """One BlockConfig field and the Python expression over the (text) config that gives it."""

    path: tuple[str, ...]  # e.g. ("attention", "num_key_value_heads") or ("ffn", "moe", "...")
    expr: str  # e.g. "text_config.num_key_value_heads", built here from validated parts only
    note: str  # for the docstring: where the expression comes from


@dataclass(frozen=True)
class KindBlock:
    """The block config of one layer kind: `attention` / `ffn` are "no_op" or fields."""

    label: str
    condition: str | None  # a Python condition on `decoder_layer`; None: every layer
    where: str  # for the docstring: the layers of the default config, or how others build it
    attention: str | tuple[ConverterField, ...]
    ffn: str | tuple[ConverterField, ...]
    notes: tuple[str, ...] = ()  # for the docstring: sizes left to the model

    @property
    def fields(self) -> tuple[ConverterField, ...]:
        return tuple(f for part in (self.attention, self.ffn) if part != NO_OP for f in part)


NO_OP = "no_op"
MAMBA_SIZES = ("state_dim", "num_heads", "head_dim", "num_groups")
MOE_REQUIRED = ("num_local_experts", "num_experts_per_tok", "expert_intermediate_dim")


def _override_note(o) -> str:
    from ..render import _location

    return f"config.{o.config_field} (read at {_location(o.read_at)})"


def kind_blocks(spec: DescriptorSpec, target: str = PUZZLETRON) -> tuple[KindBlock, ...]:
    """The block config of every layer kind. Raises PuzzleGenError naming the kind and the size
    when a block config cannot be given (no field and no rule gives a size the target's
    BlockConfig requires). Our runtime's MambaConfig takes None for a size the mixer does not
    have (a Mamba-1 mixer has no heads, head width or groups); Model Optimizer's requires all
    four, so its converter needs them."""
    probe = _LazyProbe(spec)
    several = len(spec.kinds) > 1
    blocks = []
    for kind in spec.kinds:
        fields_of: dict[str, tuple] = {}
        for o in kind_overrides(kind):
            path = tuple(o.block_config_attr.split("."))
            # a sub-config's field (DBRX's ffn_config.ffn_hidden_size) is a dotted path
            if not all(is_identifier(p) for p in path) or not is_dotted_path(o.config_field):
                raise PuzzleGenError(f"refusing to render the override {o}")
            os_, _ = fields_of.get(o.block_config_attr, ((), path))
            fields_of[o.block_config_attr] = ((*os_, o), path)

        def field(size, os_, path):
            if len(os_) > 1:
                return _per_layer_field(spec, kind, size, os_, path, several)
            (o,) = os_
            derived = _derived(probe, kind, size, o.config_field)
            if derived is not None:
                return ConverterField(path, *derived)
            return ConverterField(path, f"text_config.{o.config_field}", _override_note(o))

        def required(size):
            if size in fields_of:
                return field(size, *fields_of[size])
            derived = _derived(probe, kind, size, None)
            if derived is None:
                why = probe.why.get((kind.label, size))
                raise PuzzleGenError(
                    f"{spec.model_type}: no converter: no config field sets {size} of "
                    f"{kind.label} and no rule for it could be confirmed on tiny and "
                    "default-size models" + (f": {why}" if why else "")
                )
            return ConverterField(tuple(size.split(".")), *derived)

        sizes = set(fields_of)
        notes: list[str] = []
        if kind.subblock("attention") is None:
            attention = NO_OP
        elif any(s.startswith("attention.mamba.") for s in sizes):
            if "attention.num_key_value_heads" in sizes:
                raise PuzzleGenError(
                    f"{spec.model_type}: no converter: {kind.label} holds a key/value attention "
                    "and a Mamba mixer in one attention subblock (both sized by block configs), "
                    "but a block config's attention is one or the other: its Mamba form drops "
                    "num_key_value_heads"
                )
            mamba, missing = [], []
            for s in MAMBA_SIZES:
                try:
                    mamba.append(required(f"attention.mamba.{s}"))
                except PuzzleGenError:
                    if target == MODELOPT:
                        raise
                    missing.append(s)
            attention = tuple(mamba)
            if missing:
                notes.append(
                    f"block_config.attention.mamba.{', '.join(missing)}: None, the model's own "
                    "(no config field holds them: this mixer has none)"
                )
        else:
            attention = (required("attention.num_key_value_heads"),)
        if kind.subblock("ffn") is None:
            ffn = NO_OP
        elif any(s.startswith("ffn.moe.") for s in sizes):
            moe = [required(f"ffn.moe.{s}") for s in MOE_REQUIRED]
            if "ffn.moe.shared_expert_intermediate_dim" in sizes:
                moe.append(required("ffn.moe.shared_expert_intermediate_dim"))
            ffn = tuple(moe)
        else:
            ffn = (required("ffn.intermediate_size"),)
        blocks.append(
            KindBlock(
                label=kind.label,
                condition=kind_condition(spec, kind) if several else None,
                where=kind_where(kind),
                attention=attention,
                ffn=ffn,
                notes=tuple(notes),
            )
        )
    return tuple(blocks)


def _per_layer_field(spec, kind, size, overrides, path, several) -> ConverterField:
    """A size the layers of `kind` read from different fields (generator/per_layer_fields.py):
    each layer's from the field that layer reads, told by the tests the override recorded."""
    from ..descriptor_view import _test_expr

    if not all(o.layers for o in overrides):
        raise PuzzleGenError(
            f"{spec.model_type}: no converter: the layers of {kind.label} read {size} from "
            f"{' or '.join(f'config.{o.config_field}' for o in overrides)}, and which layer "
            "reads which could not be told by an attribute of the layer"
        )
    if not several:
        raise PuzzleGenError(
            f"{spec.model_type}: no converter: the layers of {kind.label} read {size} from "
            f"{' or '.join(f'config.{o.config_field}' for o in overrides)} depending on the "
            "layer, and a converter of a stack of one kind does not build the layers to tell"
        )
    *conditional, last = overrides
    expr = f"text_config.{last.config_field}"
    for o in reversed(conditional):
        test = " and ".join(_test_expr(t, spec) for t in o.layers)
        expr = f"(text_config.{o.config_field} if {test} else {expr})"
    note = "; ".join(
        f"{_override_note(o)} in layers with "
        + " and ".join(f"{t.child} == {t.value!r}" for t in o.layers)
        for o in overrides
    )
    return ConverterField(path, expr, note)


class _LazyProbe:
    """One SizeProbe per spec, built on first use (most converters need none)."""

    def __init__(self, spec: DescriptorSpec):
        self.spec, self._probe, self.failure = spec, None, None
        # (kind label, size) -> why no rule holds, where a rule said so (PuzzleGenError)
        self.why: dict[tuple[str, str], str] = {}

    def get(self) -> SizeProbe | None:
        if self._probe is None and self.failure is None:
            try:
                self._probe = SizeProbe(self.spec)
            except Exception as exc:  # a type whose tiny or default model does not build
                self.failure = exc
        return self._probe


def _default_holds(spec: DescriptorSpec, field: str) -> bool:
    """Whether the type's default config holds `field` as a number."""
    from ..probe import quiet_transformers
    from ..source import resolve
    from ..tiny import default_config

    try:
        with quiet_transformers():
            text = default_config(resolve(spec.model_type).config_cls).get_text_config()
    except Exception:
        return True  # nothing to measure: the field is read as it is
    value = config_value(text, field)  # dotted: a sub-config's field
    return isinstance(value, int) and not isinstance(value, bool)


def _derived(probe: _LazyProbe, kind, size: str, field: str | None) -> tuple[str, str] | None:
    """(expression, note) of a size the config does not hold as a number (`field` None or
    absent), or None when `field` holds it as it is or no rule can be confirmed."""
    if field is not None and _default_holds(probe.spec, field):
        return None
    sizes = probe.get()
    if sizes is None:
        return None
    try:
        if size == "attention.num_key_value_heads":
            return sizes.kv_heads_rule(kind)
        if size == "ffn.intermediate_size":
            return sizes.ffn_width_rule(kind, field)
        if size.startswith("attention.mamba."):
            return sizes.mamba_rule(kind, size)
    except PuzzleGenError as exc:  # a rule that says why it does not hold
        probe.why[(kind.label, size)] = str(exc)
        return None
    except Exception:  # no rule: the caller says so, or reads the field as it is
        return None
    return None


@dataclass(frozen=True)
class ConverterView:
    """What templates/converter.py.j2 reads."""

    model_type: str
    causal_lm_class: str
    causal_lm_expr: str  # how the module names the causal-LM class (several kinds only)
    transformers_version: str
    kinds: tuple[KindBlock, ...]
    layer_stack: str
    num_layers_field: str
    text_config_attr: str | None
    converter_class: str
    registration_name: str
    converter_base: bool  # a registered Model Optimizer Converter (else a plain class)
    imports: tuple[str, ...]
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint-name prefix -> module-name prefix

    @property
    def several(self) -> bool:
        return len(self.kinds) > 1


def _tree(fields: tuple[ConverterField, ...]) -> dict[str, Any]:
    """The nesting of the fields below their subblock: {"num_key_value_heads": EXPR} or
    {"moe": {"num_local_experts": EXPR, ...}}."""
    tree: dict[str, Any] = {}
    for f in fields:
        node = tree
        for part in f.path[1:-1]:
            node = node.setdefault(part, {})
        node[f.path[-1]] = f.expr
    return tree


# Names the converter template uses: an imported class must not shadow them.
CONVERTER_NAMES = {
    "Any", "PretrainedConfig", "BlockConfig", "AttentionConfig", "FFNConfig", "MoEConfig",
    "MambaConfig", "Converter", "ConverterFactory", "copy", "torch", "config", "text_config",
    "model", "decoder_layer", "block_configs", "block",
}  # fmt: skip


def render_converter(
    spec: DescriptorSpec,
    out: str | None = None,
    *,
    target: str = PUZZLETRON,
    layout: str = PACKAGE,
    command_line: str | None = None,
) -> str:
    """The converter module: `create_block_configs_from_main_config(config)`, one block config
    per layer. For our runtime a plain class; for Model Optimizer a registered `Converter`."""
    from .. import render
    from ..descriptor_view import class_expr, is_remote

    blocks = kind_blocks(spec, target)
    stack, num_layers_field = spec.layer_stack, spec.num_layers_field
    text_attr = spec.text_config_attr
    if not is_identifier(num_layers_field) or (text_attr and not is_identifier(text_attr)):
        raise PuzzleGenError("refusing to render the layer-count or text-config attribute")
    if not is_dotted_path(stack, allow_digits=True):
        raise PuzzleGenError(f"refusing to render the layer stack {stack!r}")
    names = names_for(spec, target)
    classes = {"BlockConfig"}
    for b in blocks:
        for which, cls in (("attention", "AttentionConfig"), ("ffn", "FFNConfig")):
            classes.add(cls)
        for f in b.fields:
            if "moe" in f.path:
                classes.add("MoEConfig")
            if "mamba" in f.path:
                classes.add("MambaConfig")
    first = {module_for("block_config", target, layout): classes}
    if target == MODELOPT:
        first[module_for("converter", target, layout)] = {"Converter", "ConverterFactory"}
    several = len(blocks) > 1
    lines = ["import copy"] if several else []
    lines += ["from typing import Any", ""]
    third: dict[str, set[str]] = {"transformers": {"PretrainedConfig"}}
    lm = spec.causal_lm_class
    if several:
        refs = [lm, *selector_classes(spec)]
        if any(is_remote(r) for r in refs):
            raise PuzzleGenError(
                f"{spec.model_type}: no converter: a stack of several layer kinds is told "
                "apart by building the model, and this model's classes are the checkpoint's own "
                "code"
            )
        for ref in refs:
            if ref.name in CONVERTER_NAMES or not is_identifier(ref.name):
                raise PuzzleGenError(f"refusing to import {ref.name!r} into the converter")
            if not is_dotted_path(ref.module):
                raise PuzzleGenError(f"refusing to import from {ref.module!r}")
            third.setdefault(ref.module, set()).add(ref.name)
        lines.append("import torch")
    for module in sorted(third):
        lines.append(f"from {module} import {', '.join(sort_names(third[module]))}")
    lines.append("")
    for module in sorted(first):
        if not is_dotted_path(module.lstrip(".")):
            raise PuzzleGenError(f"refusing to import from {module!r}")
        lines.append(f"from {module} import {', '.join(sort_names(first[module]))}")
    model_type, modeling_module = spec.model_type, spec.modeling_module
    version = spec.transformers_version
    view = ConverterView(
        model_type=model_type,
        causal_lm_class=lm.name,
        causal_lm_expr=class_expr(lm),
        transformers_version=version,
        kinds=blocks,
        layer_stack=stack,
        num_layers_field=num_layers_field,
        text_config_attr=text_attr,
        converter_class=names.converter_class,
        registration_name=names.registration,
        converter_base=target == MODELOPT,
        imports=tuple(lines),
        renames=spec.checkpoint_renames if target == MODELOPT else (),
    )
    cmd = command_line or render.spec_command(spec, out)
    env = render._env()
    env.filters["tree"] = _tree
    source = env.get_template("converter.py.j2").render(
        **render._header(cmd, modeling_module, version), converter=view, NO_OP=NO_OP
    )
    return render._format(source, f"converter of {model_type}")


def converter_module(spec: DescriptorSpec, target: str = PUZZLETRON) -> str:
    return f"{names_for(spec, target).package}_converter"


def package_extras(
    spec: DescriptorSpec, out: str | None, progress: Callable[[str], None]
) -> tuple[tuple[str, str], ...]:
    """The files the default target writes beside the descriptor: its converter, when the spec
    has the sizes a block config needs (else a progress line says why there is none)."""
    try:
        return ((f"{converter_module(spec)}.py", render_converter(spec, out)),)
    except PuzzleGenError as exc:
        progress(f"    {exc}")
        return ()
