"""DescriptorSpec: every inferred fact of a descriptor and its evidence.

The single contract between inference and rendering: templates read only this, inference never
formats Python. Frozen and JSON-serialisable (`to_json` / `from_json` round-trip).
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import re
from dataclasses import dataclass, field
from typing import get_args, get_origin, get_type_hints

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")


def is_identifier(text: str) -> bool:
    return bool(_IDENT.match(text)) and not keyword.iskeyword(text)


def is_dotted_path(text: str, allow_digits: bool = False) -> bool:
    """`a.b.c` made of identifiers (and, with allow_digits, list indices like `layers.0`)."""
    parts = text.split(".")
    return bool(text) and all(is_identifier(p) or (allow_digits and p.isdigit()) for p in parts)


def is_module_name(text: str) -> bool:
    """A name safe to embed in a regex and in generated code: word characters and dots."""
    return bool(_TENSOR_NAME.match(text))


@dataclass(frozen=True)
class ClassRef:
    module: str  # e.g. transformers.models.llama.modeling_llama
    name: str  # e.g. LlamaDecoderLayer


@dataclass(frozen=True)
class CarriedArgument:
    """Place `index` of the tuple a module returns holds its argument `keyword` (at `position`
    among its arguments after self) unchanged: a recurrent state it was given and hands back
    (RWKV's `return out, state`). A stand-in hands back what it was given there."""

    index: int
    keyword: str
    position: int
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleReplacement:
    """On a no-op, the decoder layer's child `attr` is replaced by `replacement`."""

    attr: str
    replacement: str  # "Same" (its input) | "MatchingZeros" (zeros like it) | "PassResidual"
    # | "PassResidual" (returns the residual argument the module adds to its output)
    tuple_size: int | None  # wrap in return_tuple_of_size(..., size) when the caller unpacks
    evidence: tuple[str, ...] = ()
    residual_position: int | None = None  # PassResidual: where the residual is passed
    residual_keyword: str | None = None  # PassResidual: the parameter's name
    # a core that adds its input to its output: the core before it, whose inputs decided which
    # subblock this is (Inkling's attn_sconv refines self_attn)
    refines: str | None = None
    returns_list: bool = False  # the sequence of tuple_size is a list (return_list_of_size)
    carried: tuple[CarriedArgument, ...] = ()  # arguments handed back (return_tuple_carrying)
    # ProjectedZeros: the replaced module's attribute holding its output width (`out_features`)
    width_attr: str | None = None


@dataclass(frozen=True)
class ConfigOverride:
    """block_config.<block_config_attr> is written to config.<config_field> for one layer."""

    config_field: str
    block_config_attr: str  # "attention.num_key_value_heads" | "ffn.intermediate_size"
    read_at: str  # location of the config read that decided it (file:line)
    evidence: tuple[str, ...] = ()
    # a config flag set alongside, so that the model uses the field verbatim (LFM2's
    # block_auto_adjust_ff_dim would otherwise scale the width by 2/3): (field, value)
    with_flag: str | None = None
    flag_value: bool | None = None
    # the layers of its kind that read this field, where the kind's layers read the size from
    # different fields (Inkling's sliding layers read swa_num_key_value_heads, its full ones
    # num_key_value_heads): tests on the layer object, as a kind's selector; () for every layer
    layers: tuple[KindTest, ...] = ()


@dataclass(frozen=True)
class Subblock:
    kind: str  # "attention" | "ffn"
    replacements: tuple[ModuleReplacement, ...]  # the no-op plan, in data-flow order
    weight_modules: tuple[str, ...]  # layer children whose tensors belong to this subblock
    joins: tuple[str, ...]  # locations of the residual joins that close the subblock
    evidence: tuple[str, ...] = ()
    # where a segment of the subblock mixes in a layer argument besides the hidden states
    # (Gemma 4's per-layer input): "file:line"
    layer_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class KindTest:
    """One condition on a built decoder layer: `isinstance(decoder_layer, cls)` (child None),
    `isinstance(decoder_layer.child, cls)`, `decoder_layer.child == value` (a plain attribute
    the layer keeps, such as Nemotron-H's `block_type`), or, with neither class nor value,
    `hasattr(decoder_layer, child)` (`not hasattr(...)` when negated)."""

    child: str | None
    cls: ClassRef | None
    negate: bool = False
    value: str | int | bool | None = None


@dataclass(frozen=True)
class LayerKind:
    """The layers of the stack that share a class and a set of children (and their classes):
    analysed once, on the first such layer, and described by one no-op plan per subblock.

    A kind may lack a subblock (a Mamba-only or MLP-only layer): its group is empty and the no-op
    of that subblock leaves the layer alone."""

    label: str  # e.g. "linear_attn + mlp (Qwen3NextGatedDeltaNet, Qwen3NextSparseMoeBlock)"
    layer_class: ClassRef
    children: tuple[str, ...]  # the layer's children, in module order
    layers: tuple[int, ...]  # the layers of this kind in the probed config
    layout: str  # "sequential" | "parallel"
    attention: Subblock | None
    ffn: Subblock | None
    shared_modules: tuple[str, ...]  # children both subblocks use (parallel layouts)
    selector: tuple[KindTest, ...]  # all hold for this kind and for no other one
    evidence: tuple[str, ...] = ()
    # a kind no layer of the probed config has, that other configs build: how (`layers` empty)
    built_by: str = ""
    # the overrides proven on this kind's layer (all of them are in DescriptorSpec.overrides):
    # which block-config sizes this kind's layers read, and from which config fields
    overrides: tuple[ConfigOverride, ...] = ()
    # parameters held by the layer itself (Doge's residual scales): kept on a no-op, grouped
    # with the attention subblock
    own_tensors: tuple[str, ...] = ()

    def subblock(self, kind: str) -> Subblock | None:
        return self.attention if kind == "attention" else self.ffn


@dataclass(frozen=True)
class RebuiltBuffers:
    """Buffers of one module that are not in the state dict (rotary inv_freq, Gemma's
    embed_scale, causal masks): a meta-device build leaves them empty and the runtime's
    rebuild_buffers fills them with the owning pretrained model's `_init_weights`."""

    module: str  # path of the module holding them below the model ("" for the model itself)
    buffers: tuple[str, ...]
    init_class: str  # the PreTrainedModel class whose _init_weights rebuilds them
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigVariant:
    """A module the default config does not build but other configs of the type do."""

    module: str  # layer-relative child (`ln_attn`) or full path (`model.decoder.project_in`)
    group: str  # "attention" | "ffn" | "embeddings" | "lm_head" | "" (not grouped)
    flag: str | None = None  # the boolean config field whose flip builds it, if one does
    flag_value: bool | None = None
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class DummyBlock:
    """What the model loop expects from a replaced (unowned) decoder block."""

    returns_tuple: bool
    attributes: tuple[str, ...]  # layer attributes the loop reads, copied onto the dummy
    evidence: tuple[str, ...] = ()
    tuple_size: int = 1  # values the loop unpacks from a layer's output (GLM-MoE-DSA: 2)
    carried: tuple[CarriedArgument, ...] = ()  # arguments a layer hands back (RWKV's state)


@dataclass(frozen=True)
class KindChildren:
    """The layer children (checkpoint spellings too) one layer kind groups with each subblock:
    what get_weight_groups tells a layer's kind by, where a child's subblock depends on it."""

    label: str  # the kind, for the rendered comment
    attention: tuple[str, ...]
    ffn: tuple[str, ...]


@dataclass(frozen=True)
class Predicates:
    """Weight-group regexes as data: escaped names, one alternative each."""

    embeddings: tuple[str, ...]  # full module/tensor names (escaped regex)
    lm_head: tuple[str, ...]
    layer_prefix: str  # escaped layer-stack path, e.g. model\.layers
    attention: tuple[str, ...]  # names relative to one layer (escaped regex)
    ffn: tuple[str, ...]
    # alternatives (among `attention`) of a child that belongs to whichever subblock its layer
    # has: Nemotron-H's `norm`, before a Mamba mixer, an attention, an MLP or experts
    followers: tuple[str, ...] = ()
    # modules a text-only forward never runs (a vision tower and its projector): full paths,
    # rendered as Model Optimizer's `vision_encoding` group
    encoders: tuple[str, ...] = ()
    # the layer stack as checkpoints name it when that differs (Nemotron-H writes
    # `backbone.layers` for the module `model.layers`): escaped, like layer_prefix
    disk_layer_prefixes: tuple[str, ...] = ()
    # layer children in the attention subblock of some kinds and in the FFN of others, in
    # layers with both (OLMo-hybrid's post_attention_layernorm): listed with the attention;
    # get_weight_groups decides each layer's by its kind, told from its children by the table
    by_kind: tuple[str, ...] = ()
    kind_children: tuple[KindChildren, ...] = ()

    def layer_prefix_regex(self) -> str:
        """The regex of the layer stack's path: one path, or an alternation of its names."""
        if not self.disk_layer_prefixes:
            return self.layer_prefix
        return "(?:" + "|".join((self.layer_prefix, *self.disk_layer_prefixes)) + ")"


@dataclass(frozen=True)
class Fact:
    """A named scalar fact with the evidence that decided it (for `inspect` and docstrings)."""

    name: str
    value: str
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class DescriptorSpec:
    model_type: str
    package: str  # python package under generated/
    class_name: str  # e.g. LlamaModelDescriptor
    generator_version: str
    transformers_version: str
    modeling_module: str
    config_class: ClassRef
    causal_lm_class: ClassRef
    decoder_layer_classes: tuple[ClassRef, ...]
    layer_stack: str  # e.g. model.layers
    layer_stack_at: str  # location of the ModuleList construction
    num_layers_field: str  # e.g. num_hidden_layers
    text_config_attr: str | None  # e.g. text_config for nested configs, None otherwise
    input_embedding: str
    output_embedding: str
    final_norm: str | None
    final_norm_at: str | None  # location of the call after the layer loop
    tied_embeddings: bool
    kinds: tuple[LayerKind, ...]  # the layer kinds of the stack, in order of first layer
    overrides: tuple[ConfigOverride, ...]  # block_config_to_layer_overrides, for every kind
    rebuilt_buffers: tuple[RebuiltBuffers, ...]
    dummy_block: DummyBlock
    predicates: Predicates
    facts: tuple[Fact, ...] = field(default=())
    # where the modeling code came from; set for checkpoint directories (generator/checkpoint.py)
    requires_trust_remote_code: bool = False
    code_origin: str = "transformers"
    source_argument: str | None = None  # the checkpoint directory as typed; None: a model type
    config_variants: tuple[ConfigVariant, ...] = ()
    # (checkpoint-name prefix, module-name prefix), longest first: what save_pretrained renames
    # (generator/checkpoint_renames.py); Model Optimizer's converter undoes them by name
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "DescriptorSpec":
        return _build(cls, json.loads(text))

    def kind_of_layer(self, index: int) -> LayerKind:
        for kind in self.kinds:
            if index in kind.layers:
                return kind
        raise KeyError(index)

    @property
    def layer_inputs(self) -> tuple[str, ...]:
        """Where layers mix in an argument besides the hidden states that the model computes
        before its layer loop (Gemma 4's per-layer inputs): every pipeline stage must run
        that computation, from the token ids."""
        return tuple(
            w
            for which in ("attention", "ffn")
            for sb in self.subblocks(which)
            for w in sb.layer_inputs
        )

    def subblocks(self, kind: str) -> list[Subblock]:
        """The subblocks of `kind` ("attention" | "ffn") of every layer kind that has one."""
        return [sb for k in self.kinds if (sb := k.subblock(kind)) is not None]

    def fact(self, name: str) -> Fact:
        for f in self.facts:
            if f.name == name:
                return f
        raise KeyError(name)


def _build(tp, data):
    """Rebuild a (nested) frozen dataclass from its asdict() form."""
    if data is None:
        return None
    if dataclasses.is_dataclass(tp):
        hints = get_type_hints(tp)
        return tp(
            **{
                f.name: _build(hints[f.name], data[f.name])
                for f in dataclasses.fields(tp)
                if f.name in data  # a field added since the JSON was written keeps its default
            }
        )
    origin = get_origin(tp)
    if origin is tuple:
        inner, *_rest = get_args(tp)
        return tuple(_build(inner, x) for x in data)
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return _build(args[0], data)
    return data


# -- validation before rendering ------------------------------------------------------------------
# Every string of a spec reaches generated code. A spec built by inference is checked here before
# rendering, and so is one read back with from_json (which could come from anywhere): a string
# that is not what its field promises is refused, never escaped into something that parses.
_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")  # dynamic modules have hash segments
_MODEL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REPLACEMENTS = ("Same", "MatchingZeros", "PassResidual", "ProjectedZeros")
LAYOUTS = ("sequential", "parallel")
_VARIANT_GROUPS = ("attention", "ffn", "embeddings", "lm_head", "")
BLOCK_CONFIG_ATTRS = (
    "attention.num_key_value_heads",
    "attention.mamba.state_dim",
    "attention.mamba.num_heads",
    "attention.mamba.head_dim",
    "attention.mamba.num_groups",
    "ffn.intermediate_size",
    "ffn.moe.num_local_experts",
    "ffn.moe.num_experts_per_tok",
    "ffn.moe.expert_intermediate_dim",
    "ffn.moe.shared_expert_intermediate_dim",
)
IMPORTED_ORIGIN = "the checkpoint's own code, imported with --trust-remote-code"
# without --trust-remote-code, a model type only the checkpoint's own code defines
# (generator/static_probe.py); loading such a model still needs that code
STATIC_ORIGIN = (
    "the checkpoint's own code, parsed with libcst and never imported: a static build from "
    "config.json and the safetensors headers"
)
CODE_ORIGINS = (
    "transformers",
    "transformers (the checkpoint's own code was parsed, not imported)",
    IMPORTED_ORIGIN,
    STATIC_ORIGIN,
)


class SpecError(ValueError):
    """A spec field holds a value that must not reach generated code."""


def _check_carried(carried, size: int, is_tuple: bool, need, ident) -> None:
    """Arguments handed back: distinct places 1..size-1 of a tuple, named by identifiers."""
    need(type(carried) is tuple, "the arguments handed back", carried)
    need(not carried or is_tuple, "arguments handed back outside a tuple", carried)
    places = [c.index for c in carried]
    need(len(set(places)) == len(places), "the places of arguments handed back", places)
    for c in carried:
        need(type(c.index) is int and 0 < c.index < size, "the place of an argument", c.index)
        ident(c.keyword, "the argument handed back")
        need(type(c.position) is int and 0 <= c.position < 100, "its position", c.position)


def check_renderable(spec: "DescriptorSpec") -> None:
    """Raise SpecError naming the first field whose value is not safe to render."""

    def need(ok: bool, what: str, value: object) -> None:
        if not ok:
            raise SpecError(f"refusing to render {what} {value!r}")

    def ident(value, what):
        need(isinstance(value, str) and is_identifier(value), what, value)

    def path(value, what, optional=False):
        if optional and value is None:
            return
        need(isinstance(value, str) and is_dotted_path(value, allow_digits=True), what, value)

    def class_ref(ref, what):
        need(
            isinstance(ref.module, str) and bool(_MODULE.match(ref.module)),
            f"{what} module",
            ref.module,
        )
        ident(ref.name, f"{what} name")

    need(
        isinstance(spec.model_type, str) and bool(_MODEL_TYPE.match(spec.model_type)),
        "the model type",
        spec.model_type,
    )
    ident(spec.package, "the package name")
    ident(spec.class_name, "the class name")
    for what, v in (
        ("generator version", spec.generator_version),
        ("transformers version", spec.transformers_version),
    ):
        need(isinstance(v, str) and bool(_VERSION.match(v)), f"the {what}", v)
    need(
        isinstance(spec.modeling_module, str) and bool(_MODULE.match(spec.modeling_module)),
        "the modeling module",
        spec.modeling_module,
    )
    class_ref(spec.config_class, "the config class")
    class_ref(spec.causal_lm_class, "the causal-LM class")
    need(bool(spec.decoder_layer_classes), "the decoder layer classes", spec.decoder_layer_classes)
    for ref in spec.decoder_layer_classes:
        class_ref(ref, "a decoder layer class")
    path(spec.layer_stack, "the layer stack path")
    ident(spec.num_layers_field, "the layer-count field")
    if spec.text_config_attr is not None:
        ident(spec.text_config_attr, "the text config attribute")
    path(spec.input_embedding, "the input embedding path")
    path(spec.output_embedding, "the output embedding path")
    path(spec.final_norm, "the final norm path", optional=True)
    for pair in spec.checkpoint_renames:
        need(
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(
                isinstance(p, str)
                and (p == "" or (p.endswith(".") and is_dotted_path(p[:-1], allow_digits=True)))
                for p in pair
            ),
            "a checkpoint rename",
            pair,
        )
    need(bool(spec.kinds), "the layer kinds", spec.kinds)
    for k in spec.kinds:
        need(isinstance(k.label, str) and bool(_LABEL.match(k.label)), "the kind label", k.label)
        class_ref(k.layer_class, "a layer kind's class")
        need(k.layout in LAYOUTS, "the layout", k.layout)
        need(k.attention is not None or k.ffn is not None, "a layer kind's subblocks", k.label)
        for name in (*k.children, *k.shared_modules, *k.own_tensors):
            ident(name, "a layer kind's child")
        for i in k.layers:
            need(type(i) is int and i >= 0, "a layer index", i)
        need(
            k.built_by == "" or bool(_BUILT_BY.match(k.built_by)),
            "how other configs build a kind",
            k.built_by,
        )
        for t in k.selector:
            if t.child is not None:
                ident(t.child, "the child a kind test reads")
            if t.cls is not None:
                class_ref(t.cls, "the class a kind test checks")
            need(t.child is not None or t.cls is not None, "a kind test", t)
            need(type(t.negate) is bool and not (t.negate and t.cls), "a kind test", t)
            need(
                t.value is None
                or (type(t.value) in (int, bool) and t.child is not None and t.cls is None)
                or (
                    type(t.value) is str
                    and not _CONTROL.search(t.value)
                    and t.child is not None
                    and t.cls is None
                ),
                "a kind test's value",
                t.value,
            )
        for o in k.overrides:
            need(o in spec.overrides, "a layer kind's override", o)
        for sb in (k.attention, k.ffn):
            if sb is None:
                continue
            for r in sb.replacements:
                # a child, or a child of a container the layer's forward reads through
                need(
                    isinstance(r.attr, str) and is_dotted_path(r.attr),
                    f"the {sb.kind} child",
                    r.attr,
                )
                need(r.replacement in REPLACEMENTS, "the no-op replacement", r.replacement)
                need(
                    (r.width_attr is not None) == (r.replacement == "ProjectedZeros")
                    and (r.width_attr is None or is_identifier(r.width_attr)),
                    "the output-width attribute of a ProjectedZeros no-op",
                    repr(r.width_attr),
                )
                need(
                    r.tuple_size is None or (type(r.tuple_size) is int and 0 < r.tuple_size < 100),
                    "the tuple size",
                    r.tuple_size,
                )
                need(type(r.returns_list) is bool, "whether a no-op returns a list", r.returns_list)
                _check_carried(r.carried, r.tuple_size or 1, not r.returns_list, need, ident)
                if r.residual_keyword is not None:
                    ident(r.residual_keyword, "the residual argument")
                if r.refines is not None:
                    path(r.refines, "the core a refining core refines")
                need(
                    r.residual_position is None
                    or (type(r.residual_position) is int and 0 <= r.residual_position < 100),
                    "the residual position",
                    r.residual_position,
                )
            for name in sb.weight_modules:
                path(name, f"the {sb.kind} weight module")
    for o in spec.overrides:
        path(o.config_field, "the config field")
        need(
            o.block_config_attr in BLOCK_CONFIG_ATTRS,
            "the block config attribute",
            o.block_config_attr,
        )
        for t in o.layers:
            need(
                t.value is not None and t.cls is None and t.child is not None and not t.negate,
                "a test of the layers that read an override's field",
                t,
            )
            ident(t.child, "the attribute the layers that read a field are told apart by")
            need(
                type(t.value) in (int, bool)
                or (type(t.value) is str and not _CONTROL.search(t.value)),
                "a test's value",
                t.value,
            )
        if o.with_flag is not None:
            ident(o.with_flag, "the override's config flag")
            need(type(o.flag_value) is bool, "the override's flag value", o.flag_value)
    for b in spec.rebuilt_buffers:
        if b.module:
            path(b.module, "the buffer owner path")
        ident(b.init_class, "the class whose _init_weights rebuilds buffers")
        for name in b.buffers:
            ident(name, "the buffer name")
    for v in spec.config_variants:
        path(v.module, "the config-variant module")
        need(v.group in _VARIANT_GROUPS, "the config-variant group", v.group)
        if v.flag is not None:
            ident(v.flag, "the config-variant flag")
            need(type(v.flag_value) is bool, "the config-variant flag value", v.flag_value)
    need(
        type(spec.dummy_block.returns_tuple) is bool,
        "the dummy block's tuple flag",
        spec.dummy_block.returns_tuple,
    )
    need(
        type(spec.dummy_block.tuple_size) is int
        and spec.dummy_block.tuple_size >= 1
        and (spec.dummy_block.returns_tuple or spec.dummy_block.tuple_size == 1),
        "the dummy block's tuple size",
        spec.dummy_block.tuple_size,
    )
    for name in spec.dummy_block.attributes:
        ident(name, "the dummy block attribute")
    _check_carried(
        spec.dummy_block.carried,
        spec.dummy_block.tuple_size,
        spec.dummy_block.returns_tuple,
        need,
        ident,
    )
    p = spec.predicates
    for alt in p.followers:
        need(alt in p.attention, "a follower alternative", alt)
    need(not (p.by_kind and p.followers), "kind-decided children beside followers", p.by_kind)
    need(not p.by_kind or len(p.kind_children) > 1, "the layer-kind table", p.kind_children)
    for name in p.by_kind:
        ident(name, "a child grouped by its layer's kind")
        need(module_alternative_of(name) in p.attention, "a kind-decided child", name)
    for k in p.kind_children:
        need(isinstance(k.label, str) and bool(_LABEL.match(k.label)), "a kind label", k.label)
        for name in (*k.attention, *k.ffn):
            ident(name, "a child of a layer kind")
    for alt in (
        *p.embeddings,
        *p.lm_head,
        *p.encoders,
        p.layer_prefix,
        *p.disk_layer_prefixes,
        *p.attention,
        *p.ffn,
    ):
        need(isinstance(alt, str) and bool(_REGEX_ALT.match(alt)), "the regex alternative", alt)
        try:
            re.compile(alt)
        except re.error:
            need(False, "the regex alternative", alt)
    need(
        type(spec.requires_trust_remote_code) is bool,
        "the trust flag",
        spec.requires_trust_remote_code,
    )
    need(spec.code_origin in CODE_ORIGINS, "the code origin", spec.code_origin)
    if spec.source_argument is not None:
        need(
            isinstance(spec.source_argument, str) and not _CONTROL.search(spec.source_argument),
            "the checkpoint argument",
            spec.source_argument,
        )


def module_alternative_of(name: str) -> str:
    """The predicates' alternative for every tensor below layer child `name`."""
    return re.escape(name) + r"\..+"


_REGEX_ALT = re.compile(r"[A-Za-z0-9_\\.+]+\Z")
_BUILT_BY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\[i\] = '[A-Za-z0-9_]+'\Z")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ ,:()]*\Z")  # class and child names only
