"""Targets, layouts, converters and pruning layer descriptors for NVIDIA Model Optimizer.

A descriptor is rendered for one *target*, the package its import lines name:

- ``puzzletron``: this project's runtime (``puzzletron_runtime``), what ``generated/`` holds;
- ``modelopt``: Model Optimizer's own API (``modelopt.torch.puzzletron``), the same descriptor
  with other import lines, plus what Model Optimizer has and our runtime does not (a ``Converter``
  base class and ``ConverterFactory`` registration, pruning layer descriptors and
  ``pruning_mixins()``), and what our runtime has and Model Optimizer does not, written into the
  generated module itself (the buffer rebuild, a dummy block returning a tuple): a Model
  Optimizer descriptor imports only Model Optimizer, transformers and torch.

and in one *layout*:

- ``package``: ``<out>/<package>/{__init__,<package>_model_descriptor,<package>_converter}.py``
  with absolute imports (the default);
- ``modelopt-tree``: the files a pull request to Model Optimizer adds under
  ``modelopt/torch/puzzletron/anymodel/models/<name>/``, importing Model Optimizer with relative
  imports the way its own models do (``from ....block_config import BlockConfig``); implies the
  ``modelopt`` target.

Registration names (the rule): a descriptor and its converter register under the model type,
unless Model Optimizer already registers that name (``MODELOPT_REGISTERED``; its factories raise
on a second class under a taken name), in which case they register as ``<model_type>_generated``,
and the package and class names follow (``llama_generated``,
``LlamaGeneratedModelDescriptor``), so that Model Optimizer's own model and ours import side by
side. The default target registers in our own factory and keeps the model type.

Pruning layer descriptors are inferred from data flow on a tiny model of the type, not from names:
forward hooks record which ``nn.Linear`` of a subblock's core reads the core's input and which one
produces the core's output; see ``infer_pruning``.

Everything this module reads of a ``DescriptorSpec`` goes through the few functions of the
"spec reads" section below, so that a change of the spec is adapted there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .descriptor_view import _sort_names
from .errors import PuzzleGenError
from .spec import DescriptorSpec, is_dotted_path, is_identifier

PUZZLETRON = "puzzletron"
MODELOPT = "modelopt"
TARGETS = (PUZZLETRON, MODELOPT)
PACKAGE = "package"
MODELOPT_TREE = "modelopt-tree"
LAYOUTS = (PACKAGE, MODELOPT_TREE)

RUNTIME = "puzzletron_runtime"
MODELOPT_ROOT = "modelopt.torch.puzzletron"

# Names nvidia-modelopt 0.47 registers in ModelDescriptorFactory and ConverterFactory (a test in
# the Model Optimizer environment compares this with the installed factories).
MODELOPT_REGISTERED = frozenset(
    {
        "gpt_oss",
        "llama",
        "mistral_small",
        "nemotron_h",
        "nemotron_h_v2",
        "qwen2",
        "qwen3",
        "qwen3_vl",
    }
)
TAKEN_SUFFIX = "_generated"

# our runtime's submodule -> (Model Optimizer absolute module, relative from models/<name>/).
# puzzletron_runtime.buffers has no counterpart: the modelopt target writes the rebuild inline.
_MODULES = {
    "block_config": (f"{MODELOPT_ROOT}.block_config", "....block_config"),
    "model_descriptor": (f"{MODELOPT_ROOT}.anymodel.model_descriptor", "...model_descriptor"),
    "puzzformer.no_op": (f"{MODELOPT_ROOT}.anymodel.puzzformer.no_op", "...puzzformer.no_op"),
    "utils.dummy_modules": (f"{MODELOPT_ROOT}.utils.dummy_modules", "....utils.dummy_modules"),
    "converter": (f"{MODELOPT_ROOT}.anymodel.converter", "...converter"),
    "pruning.ffn_intermediate_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.ffn_intermediate_pruning_mixin",
        "....pruning.ffn_intermediate_pruning_mixin",
    ),
    "pruning.kv_heads_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.kv_heads_pruning_mixin",
        "....pruning.kv_heads_pruning_mixin",
    ),
    "pruning.expert_removal_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.expert_removal_pruning_mixin",
        "....pruning.expert_removal_pruning_mixin",
    ),
}

# pruning_mixins() keys: Model Optimizer's own descriptors use "kv_heads" and
# "experts_removal"; FFN width pruning has no key there yet, so we name it after its mixin.
FFN_MIXIN_KEY = "ffn_intermediate"
KV_MIXIN_KEY = "kv_heads"
EXPERTS_MIXIN_KEY = "experts_removal"


# -- spec reads: everything this module takes from a DescriptorSpec ---------------------------
# (the stack's layer kinds, each with its subblocks, no-op plans and the overrides proven on it)

SUBBLOCK_KINDS = ("attention", "ffn")


def spec_kinds(spec: DescriptorSpec) -> tuple:
    """The layer kinds of the stack (LayerKind), in order of first layer."""
    return spec.kinds


def kind_overrides(kind, which: str | None = None) -> tuple:
    """The overrides proven on a layer of `kind`, those of subblock `which` when given."""
    return tuple(
        o for o in kind.overrides if which is None or o.block_config_attr.startswith(f"{which}.")
    )


def kind_cores(kind, which: str) -> list[str]:
    """The layer children that compute subblock `which` (what a no-op replaces by zeros, or by
    the residual they add themselves), in data-flow order."""
    sb = kind.subblock(which)
    if sb is None:
        return []
    return [r.attr for r in sb.replacements if r.replacement in ("MatchingZeros", "PassResidual")]


def kind_weight_modules(kind, which: str) -> tuple[str, ...]:
    """The layer children whose tensors belong to subblock `which` of a layer kind."""
    sb = kind.subblock(which)
    return () if sb is None else sb.weight_modules


def kind_where(kind) -> str:
    """The layers of the default config the kind has, or how other configs build it."""
    from .descriptor_view import layer_ranges

    if kind.built_by:
        return f"no layer of the default config; configs with {kind.built_by} build it"
    many = "s" if len(kind.layers) > 1 else ""
    return f"layer{many} {layer_ranges(kind.layers)} of the default config"


def kind_condition(spec: DescriptorSpec, kind) -> str:
    """The Python condition on `decoder_layer` that holds for the layers of `kind` only (the
    one the descriptor's no-ops dispatch on)."""
    from .descriptor_view import _condition

    return _condition([kind], spec)


def kind_holds(spec: DescriptorSpec, kind, layer) -> bool:
    """Whether a built layer is of `kind` (its selector, evaluated here)."""
    import importlib

    from .kinds import _holds

    if len(spec_kinds(spec)) == 1:
        return True
    classes = {}
    for t in kind.selector:
        if t.cls is not None:
            classes[t.cls] = getattr(importlib.import_module(t.cls.module), t.cls.name)
    return all(_holds(t, layer, classes) for t in kind.selector)


def spec_kind_classes(spec: DescriptorSpec) -> list:
    """The classes (ClassRef) the kind selectors test."""
    refs = []
    for kind in spec_kinds(spec):
        for t in kind.selector:
            if t.cls is not None and t.cls not in refs:
                refs.append(t.cls)
    return refs


def spec_layers(spec: DescriptorSpec) -> tuple[str, str, str | None]:
    """(layer stack path, the config field of the layer count, the nested text config's
    attribute or None)."""
    return spec.layer_stack, spec.num_layers_field, spec.text_config_attr


def spec_dummy_block(spec: DescriptorSpec) -> tuple[bool, tuple[str, ...]]:
    """(whether the model loop indexes a layer's output as a tuple, the layer attributes it
    reads)."""
    return spec.dummy_block.returns_tuple, spec.dummy_block.attributes


def spec_no_op_stand_ins(spec: DescriptorSpec) -> set[str]:
    """The no-op stand-in classes the descriptor's no-op methods use (Same, MatchingZeros...)."""
    return {
        r.replacement
        for kind in spec_kinds(spec)
        for which in SUBBLOCK_KINDS
        if (sb := kind.subblock(which)) is not None
        for r in sb.replacements
    }


def spec_rebuilds_buffers(spec: DescriptorSpec) -> bool:
    """Whether some module keeps buffers a meta-device build leaves empty (rotary tables...)."""
    return bool(spec.rebuilt_buffers)


def spec_moves_followers(spec: DescriptorSpec) -> bool:
    """Whether get_weight_groups moves tensors to a layer's sole subblock (Nemotron-H's norm)."""
    return bool(spec.predicates.followers)


def spec_names(spec: DescriptorSpec) -> tuple[str, str, str]:
    """(model type, package, descriptor class name)."""
    return spec.model_type, spec.package, spec.class_name


def spec_source(spec: DescriptorSpec) -> tuple[str, str, str]:
    """(causal-LM class name, modeling module, transformers version) for headers and docstrings."""
    return spec.causal_lm_class.name, spec.modeling_module, spec.transformers_version


# -- targets and names -------------------------------------------------------------------------


def check_target(target: str, layout: str) -> str:
    """The effective target: modelopt-tree implies modelopt; refuse a contradiction."""
    if target not in TARGETS:
        raise PuzzleGenError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise PuzzleGenError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == MODELOPT_TREE and target != MODELOPT:
        raise PuzzleGenError(
            "--layout modelopt-tree writes Model Optimizer files: use --target modelopt"
        )
    return target


def module_for(submodule: str, target: str, layout: str = PACKAGE) -> str:
    """The module a generated file imports for our runtime's `submodule` under `target`."""
    if target == PUZZLETRON:
        if submodule.startswith("pruning.") or submodule == "converter":
            raise PuzzleGenError(f"{RUNTIME} has no {submodule} module")
        return f"{RUNTIME}.{submodule}"
    if submodule not in _MODULES:
        raise PuzzleGenError(
            f"Model Optimizer has no counterpart of {RUNTIME}.{submodule}: a Model Optimizer "
            "descriptor cannot import it"
        )
    absolute, relative = _MODULES[submodule]
    return relative if layout == MODELOPT_TREE else absolute


def registration_name(model_type: str, target: str) -> str:
    if target == MODELOPT and model_type in MODELOPT_REGISTERED:
        return model_type + TAKEN_SUFFIX
    return model_type


@dataclass(frozen=True)
class Names:
    registration: str
    package: str
    descriptor_class: str
    converter_class: str

    @property
    def prefix(self) -> str:
        return self.descriptor_class[: -len("ModelDescriptor")]


def names_for(spec: DescriptorSpec, target: str) -> Names:
    model_type, package, cls = spec_names(spec)
    registration = registration_name(model_type, target)
    if not cls.endswith("ModelDescriptor"):
        raise PuzzleGenError(f"descriptor class {cls!r} does not end in ModelDescriptor")
    if registration != model_type:
        package = f"{package}{TAKEN_SUFFIX}"
        cls = cls[: -len("ModelDescriptor")] + "GeneratedModelDescriptor"
    prefix = cls[: -len("ModelDescriptor")]
    result = Names(registration, package, cls, f"{prefix}Converter")
    for ident in (result.package, result.descriptor_class, result.converter_class):
        if not is_identifier(ident):
            raise PuzzleGenError(f"refusing to render the name {ident!r}")
    return result


def target_spec(spec: DescriptorSpec, target: str) -> DescriptorSpec:
    """The spec with the package and class names of `target` (see the registration rule)."""
    n = names_for(spec, target)
    return dataclasses.replace(spec, package=n.package, class_name=n.descriptor_class)


def command(spec: DescriptorSpec, out: str | None, target: str, layout: str) -> str:
    """The command line that regenerates a file of `target` / `layout` (its header says it)."""
    from .render import spec_command

    base = spec_command(spec, None)
    out_flag = spec_command(spec, out)[len(base) :]  # " --out DIR", quoted and checked
    flags = f" --target {target}" if target != PUZZLETRON else ""
    flags += f" --layout {layout}" if layout != PACKAGE else ""
    return base + flags + out_flag


# -- the converter -----------------------------------------------------------------------------
#
# One block config per layer, following the config's own per-layer pattern. The rule: the
# converter asks the modeling code which kind each layer is, by building the model from the
# config it is given on the meta device (no memory, no weights) and testing each built layer
# with the kind selectors the descriptor's no-ops use. A pattern field (`layer_types`,
# `hybrid_override_pattern`, `mlp_only_layers`, `first_k_dense_replace`, `moe_layer_freq`, ...)
# is then read exactly where and how the modeling code reads it, including defaults and
# derived patterns the config computes, for any config of the type, and no per-type parser is
# written. A stack of one kind needs no build: every layer is that kind.
#
# Each kind's sizes are read from the config fields its own overrides write back (so its block
# configs, fed back through `block_config_to_layer_overrides`, rebuild the model the config
# describes), and a size Model Optimizer's BlockConfig requires that no override of the kind
# sets comes from a rule measured on tiny and default-size models (`_SizeProbe`).


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
# config fields that name a KV-head count (a candidate where the layer reads one the override
# inference did not confirm)
KV_FIELDS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")
MAMBA_SIZES = ("state_dim", "num_heads", "head_dim", "num_groups")
MOE_REQUIRED = ("num_local_experts", "num_experts_per_tok", "expert_intermediate_dim")


def _override_note(o) -> str:
    from .render import _location

    return f"config.{o.config_field} (read at {_location(o.read_at)})"


def kind_blocks(spec: DescriptorSpec, target: str = PUZZLETRON) -> tuple[KindBlock, ...]:
    """The block config of every layer kind. Raises PuzzleGenError naming the kind and the size
    when a block config cannot be given (no field and no rule gives a size the target's
    BlockConfig requires). Our runtime's MambaConfig takes None for a size the mixer does not
    have (a Mamba-1 mixer has no heads, head width or groups); Model Optimizer's requires all
    four, so its converter needs them."""
    probe = _LazyProbe(spec)
    several = len(spec_kinds(spec)) > 1
    blocks = []
    for kind in spec_kinds(spec):
        fields_of = {}
        for o in kind_overrides(kind):
            path = tuple(o.block_config_attr.split("."))
            if not all(is_identifier(p) for p in path) or not is_identifier(o.config_field):
                raise PuzzleGenError(f"refusing to render the override {o}")
            fields_of[o.block_config_attr] = (o, path)

        def field(size, o, path):
            derived = _derived(probe, kind, size, o.config_field)
            if derived is not None:
                return ConverterField(path, *derived)
            return ConverterField(path, f"text_config.{o.config_field}", _override_note(o))

        def required(size):
            if size in fields_of:
                return field(size, *fields_of[size])
            derived = _derived(probe, kind, size, None)
            if derived is None:
                raise PuzzleGenError(
                    f"{spec_names(spec)[0]}: no converter: no config field sets {size} of "
                    f"{kind.label} and no rule for it could be confirmed on tiny and "
                    "default-size models"
                )
            return ConverterField(tuple(size.split(".")), *derived)

        sizes = set(fields_of)
        notes: list[str] = []
        if kind.subblock("attention") is None:
            attention = NO_OP
        elif any(s.startswith("attention.mamba.") for s in sizes):
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


class _LazyProbe:
    """One _SizeProbe per spec, built on first use (most converters need none)."""

    def __init__(self, spec: DescriptorSpec):
        self.spec, self._probe, self.failure = spec, None, None

    def get(self) -> "_SizeProbe | None":
        if self._probe is None and self.failure is None:
            try:
                self._probe = _SizeProbe(self.spec)
            except Exception as exc:  # a type whose tiny or default model does not build
                self.failure = exc
        return self._probe


def _default_holds(spec: DescriptorSpec, field: str) -> bool:
    """Whether the type's default config holds `field` as a number."""
    from .probe import quiet_transformers
    from .source import resolve
    from .tiny import default_config

    try:
        with quiet_transformers():
            text = default_config(resolve(spec_names(spec)[0]).config_cls).get_text_config()
    except Exception:
        return True  # nothing to measure: the field is read as it is
    value = getattr(text, field, None)
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
    except Exception:  # no rule: the caller says so, or reads the field as it is
        return None
    return None


class _SizeProbe:
    """Tiny and default-size builds of one model type, for rules a converter applies to a
    config that does not hold a size as a number. Every rule is an expression over the text
    config, evaluated here on both configs against what the model builds, on a layer of the
    kind it is for."""

    def __init__(self, spec: DescriptorSpec):
        from .probe import quiet_transformers
        from .source import resolve
        from .tiny import default_config, tiny_config

        self.spec = spec
        self.stack = spec_layers(spec)[0]
        self.source = resolve(spec_names(spec)[0])
        self._tiny_config = tiny_config
        with quiet_transformers():
            self.tiny = tiny_config(self.source.config_cls)
            self.default = default_config(self.source.config_cls)

    def config(self, **changes):
        """The tiny config with `changes` to its text config (as the override probes set
        them)."""
        from .probe import quiet_transformers

        with quiet_transformers():
            config = self._tiny_config(self.source.config_cls)
        text = config.get_text_config()
        for field, value in changes.items():
            setattr(text, field, value)
        return config

    def model(self, config, device="meta"):
        from .probe import build_model

        return build_model(self.source.causal_lm_cls, config, device)

    def shapes(self, config) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model(config).state_dict().items()}

    def layer_of(self, kind, config) -> int:
        """The first layer of `kind` in the model `config` builds (by the kind's selector)."""
        stack = self.model(config).get_submodule(self.stack)
        for i, layer in enumerate(stack):
            if kind_holds(self.spec, kind, layer):
                return i
        raise PuzzleGenError(f"{kind.label}: no layer of this kind in the probed model")

    def subblock_dims(self, kind, which: str, config) -> set[int]:
        """Every dimension of the `which` tensors of the first layer of `kind`, except the
        hidden size."""
        hidden = config.get_text_config().hidden_size
        layer = f"{self.stack}.{self.layer_of(kind, config)}"
        modules = kind_weight_modules(kind, which)
        prefixes = tuple(f"{layer}.{m}." for m in modules)
        dims = {
            d for k, shape in self.shapes(config).items() if k.startswith(prefixes) for d in shape
        }
        return dims - {hidden}

    @staticmethod
    def evaluate(expr: str, config) -> Any:
        return eval(compile(expr, "<converter>", "eval"), {}, {"text_config": config})  # noqa: S307

    def ffn_width_rule(self, kind, field: str | None) -> tuple[str, str]:
        """The FFN width of a config whose `field` is None (the width a None builds), or of a
        model with no width field at all (a multiple of the hidden size, possibly a field)."""
        tiny = self.tiny.get_text_config()
        hidden = tiny.hidden_size
        if field is not None:
            base = self.shapes(self.tiny)
            widths = [
                c
                for c in sorted(self.subblock_dims(kind, "ffn", self.tiny))
                if self.shapes(self.config(**{field: c})) == base
            ]
            if len(widths) != 1 or widths[0] % hidden:
                raise PuzzleGenError(
                    f"config.{field}=None builds no single multiple of hidden_size"
                )
            ratio = widths[0] // hidden
            expr = (
                f"text_config.{field} if text_config.{field} is not None "
                f"else {ratio} * text_config.hidden_size"
            )
            note = (
                f"config.{field}, or {ratio} x hidden_size where it is None (the width a None "
                "builds, measured on tiny and default-size models)"
            )
        else:
            dims = sorted(d for d in self.subblock_dims(kind, "ffn", self.tiny) if d % hidden == 0)
            if not dims:
                raise PuzzleGenError("no FFN dimension is a multiple of hidden_size")
            ratio = dims[0] // hidden
            expr, note = f"{ratio} * text_config.hidden_size", (
                f"{ratio} x hidden_size: no config field sets the FFN width alone (measured on "
                "tiny and default-size models)"
            )
            for name, value in sorted(vars(tiny).items()):
                if value != ratio or isinstance(value, bool) or not is_identifier(name):
                    continue
                try:
                    changed = self.config(**{name: ratio + 1})
                    if (ratio + 1) * hidden in self.subblock_dims(kind, "ffn", changed):
                        expr = f"text_config.{name} * text_config.hidden_size"
                        note = f"config.{name} x hidden_size, as the modeling code builds it (measured)"
                        break
                except Exception:
                    continue
        for config in (self.tiny, self.default):
            width = self.evaluate(expr, config.get_text_config())
            if field is not None:  # the width a None builds: the same shapes as that width
                same = self.shapes(config) == self.shapes(self._with(config, field, width))
            else:
                same = width in self.subblock_dims(kind, "ffn", config)
            if not same:
                raise PuzzleGenError(f"{expr} is not the FFN width of the model")
        return expr, note

    def _with(self, config, field: str, value: int):
        import copy

        changed = copy.deepcopy(config)
        setattr(changed.get_text_config(), field, value)
        return changed

    def kv_heads_rule(self, kind) -> tuple[str, str]:
        """The heads of the key/value cache a forward fills in a layer of `kind`, where no
        override sets them: all the attention heads (multi-head attention), a KV-head field the
        layer reads without an override, or one (multi-query, or a latent cache); the first
        candidate that equals the cache's heads on the tiny config and on configs with another
        head count and another value of each KV-head field."""
        text = self.tiny.get_text_config()
        heads = type(text).attribute_map.get("num_attention_heads", "num_attention_heads")
        present = [f for f in KV_FIELDS if isinstance(getattr(text, f, None), int)]
        count = text.num_attention_heads
        variants = [(heads, h) for h in (count // 2, count * 2)]
        for f in present:
            variants += [(f, v) for v in (getattr(text, f) // 2, getattr(text, f) * 2)]
        measured = [(text, self._cache_heads(kind, self.tiny))]
        for f, value in variants:
            if value < 1 or text.hidden_size % value:
                continue
            try:
                config = self.config(**{f: value})
                measured.append((config.get_text_config(), self._cache_heads(kind, config)))
            except Exception:  # a combination the config refuses
                continue
        if len({(c.num_attention_heads, kv) for c, kv in measured}) < 2:
            raise PuzzleGenError("no second configuration to confirm a KV-heads rule on")
        candidates = [
            ("text_config.num_attention_heads", "config.num_attention_heads: every attention "
             "head has its own keys and values"),
            *((f"text_config.{f}", f"config.{f}, which the layer reads without an override")
              for f in present),
            ("1", "1: one head at any head count (multi-query or latent attention)"),
        ]  # fmt: skip
        for expr, note in candidates:
            if all(self.evaluate(expr, c) == kv for c, kv in measured):
                n = len(measured)
                return expr, f"{note} (the key/value cache of tiny forwards, {n} configs)"
        found = ", ".join(f"{kv} at {c.num_attention_heads} heads" for c, kv in measured)
        raise PuzzleGenError(f"cache heads {found}: no rule")

    def _cache_heads(self, kind, config) -> int:
        import torch

        index = self.layer_of(kind, config)
        torch.manual_seed(0)
        model = self.model(config, "cpu")
        vocab = config.get_text_config().vocab_size
        with torch.no_grad():
            out = model(input_ids=torch.arange(6).unsqueeze(0) % vocab, use_cache=True)
        keys = out.past_key_values.layers[index].keys
        return int(keys.shape[1])

    def mamba_rule(self, kind, size: str) -> tuple[str, str]:
        """A Mamba size no per-layer override sets (transformers reads the whole model's value:
        a layer alone with another value does not build): the field of the override inference's
        candidates (overrides.MAMBA_FIELDS) that the config holds as a number and whose change
        changes the tensor shapes of that layer's mixer and of nothing outside the mixers."""
        from .overrides import MAMBA_FIELDS, _other_size

        text = self.tiny.get_text_config()
        index = self.layer_of(kind, self.tiny)
        base = self.shapes(self.tiny)
        mixers = kind_weight_modules(kind, "attention")
        for name in MAMBA_FIELDS[size]:
            value = getattr(text, name, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            other = _other_size(value, text)
            try:
                changed = self.shapes(self.config(**{name: other}))
            except Exception:
                continue
            diff = {k for k in set(base) | set(changed) if base.get(k) != changed.get(k)}
            in_mixers = {
                k
                for k in diff
                if k.startswith(f"{self.stack}.")
                and k[len(self.stack) + 1 :].partition(".")[2].split(".")[0] in mixers
            }
            mine = {k for k in diff if k.startswith(f"{self.stack}.{index}.")}
            if diff and diff == in_mixers and mine:
                return f"text_config.{name}", (
                    f"config.{name}: it resizes every mixer's tensors; not per layer "
                    "(transformers reads the whole model's value)"
                )
        raise PuzzleGenError(f"no config field holds {size}")


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
    from . import render
    from .descriptor_view import class_expr, is_remote

    blocks = kind_blocks(spec, target)
    stack, num_layers_field, text_attr = spec_layers(spec)
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
        refs = [lm, *spec_kind_classes(spec)]
        if any(is_remote(r) for r in refs):
            raise PuzzleGenError(
                f"{spec_names(spec)[0]}: no converter: a stack of several layer kinds is told "
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
        lines.append(f"from {module} import {', '.join(_sort_names(third[module]))}")
    lines.append("")
    for module in sorted(first):
        if not is_dotted_path(module.lstrip(".")):
            raise PuzzleGenError(f"refusing to import from {module!r}")
        lines.append(f"from {module} import {', '.join(_sort_names(first[module]))}")
    model_type, _, _ = spec_names(spec)
    lm_class, modeling_module, version = spec_source(spec)
    view = ConverterView(
        model_type=model_type,
        causal_lm_class=lm_class,
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


# -- pruning layer descriptors -----------------------------------------------------------------
#
# Inferred per layer kind, from data flow on a tiny model and from what a probe build changes,
# never from module names. Model Optimizer's mixins hook every module whose name ends with the
# descriptor's module name and skip layers whose tensors are not there, so in a stack of several
# kinds one descriptor serves the kinds that have that subblock, when they all give the same one.


@dataclass(frozen=True)
class FFNLayer:
    down_proj_name: str  # relative to the decoder layer, e.g. mlp.down_proj
    ffn_prefix_name: str  # e.g. model.layers.{layer_idx}.mlp
    linear_weight_names: tuple[str, ...]  # relative to the FFN prefix
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class KVHeadsLayer:
    o_proj_name: str  # relative to the decoder layer, e.g. self_attn.o_proj
    attn_prefix_name: str  # e.g. model.layers.{layer_idx}.self_attn
    qkvo_weight_names: tuple[str, str, str, str]  # relative to the attention prefix, q, k, v, o
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertsLayer:
    """Model Optimizer's ExpertRemovalLayerDescriptor: names relative to the MoE module."""

    target_name: str  # the router, relative to the decoder layer (what the hooks watch)
    moe_prefix_name: str  # e.g. model.layers.{layer_idx}.mlp
    expert_prefix_name: str  # "experts.{expert_idx}" (per-expert) or "" (fused)
    router_weights: tuple[str, ...]
    router_biases: tuple[str, ...]
    expert_weights: tuple[str, ...]  # per-expert, relative to the expert prefix
    expert_biases: tuple[str, ...]
    is_fused_experts: bool
    fused_expert_weights: tuple[str, ...]  # fused, relative to the MoE prefix
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pruning:
    ffn: FFNLayer | None
    kv_heads: KVHeadsLayer | None
    ffn_reason: str  # why there is no FFN layer descriptor ("" when there is one)
    kv_reason: str
    experts: ExpertsLayer | None = None
    experts_reason: str = ""


def _single_core(kind, which: str) -> str | None:
    cores = kind_cores(kind, which)
    return cores[0] if len(cores) == 1 else None


class _Flow:
    """Forward hooks on a core module and its nn.Linear descendants of a tiny model: which
    linears read the core's input tensor, which one produced its output tensor."""

    def __init__(self, model, core, vocab: int, scale: str | None = None):
        import torch
        from torch import nn

        self.linears = {n: m for n, m in core.named_modules() if n and isinstance(m, nn.Linear)}
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.core_in = self.core_out = None
        hooks = []

        def core_hook(_m, args, kwargs, output):
            if self.core_in is None:  # the first call: layer 0 in a model of shared cores
                self.core_in = args[0] if args else kwargs.get("hidden_states")
                self.core_out = output[0] if isinstance(output, (tuple, list)) else output

        hooks.append(core.register_forward_hook(core_hook, with_kwargs=True))
        for name, lin in self.linears.items():

            def hook(_m, args, output, name=name):
                self.inputs.setdefault(name, args[0])
                self.outputs.setdefault(name, output)
                if name == scale:
                    return output * 2

            hooks.append(lin.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(input_ids=torch.arange(8).unsqueeze(0) % vocab)
        finally:
            for h in hooks:
                h.remove()

    def readers_of_input(self) -> list[str]:
        return sorted(n for n, x in self.inputs.items() if x is self.core_in)

    def producer_of_output(self) -> list[str]:
        return sorted(n for n, y in self.outputs.items() if y is self.core_out)


def _tiny(spec: DescriptorSpec, **extra):
    from .probe import build_model, quiet_transformers
    from .source import resolve
    from .tiny import tiny_config

    source = resolve(spec_names(spec)[0])
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    text = config.get_text_config()
    for field, value in extra.items():  # on the text config, as the override probes set them
        setattr(text, field, value)
    import torch

    torch.manual_seed(0)
    return build_model(source.causal_lm_cls, config, "cpu").eval(), config


def _first_layer(spec: DescriptorSpec, kind, model) -> int | None:
    stack = model.get_submodule(spec_layers(spec)[0])
    for i, layer in enumerate(stack):
        if kind_holds(spec, kind, layer):
            return i
    return None


def infer_pruning(spec: DescriptorSpec) -> Pruning:
    """FFN-intermediate, KV-heads and expert-removal layer descriptors from data flow on a tiny
    model, for the layer kinds that have the subblock (each traced on its first layer).

    FFN: the core's linears are either input projections (read the core's input, output the
    FFN width) or the single output projection (its output is the core's output, its input the
    FFN width); anything else (a fused gate/up tensor twice the width, a linear in between) and
    Model Optimizer's mixin, which slices rows of inputs and columns of the output by the width,
    would cut the wrong rows: no descriptor.
    KV heads: exactly three linears read the attention's input and one produces its output; the
    two whose shapes follow the KV-head field are k and v, and v is the one whose doubled output
    doubles the output projection's input exactly (attention is linear in v, not in k). A fused
    q/k/v projection is one tensor the mixin cannot address by name: no descriptor.
    Experts: see `_experts_layer`.
    """
    try:
        model, config = _tiny(spec)
    except Exception as exc:
        reason = f"the tiny model does not build: {type(exc).__name__}: {exc}"
        return Pruning(None, None, reason, reason, None, reason)
    text = config.get_text_config()
    vocab = text.vocab_size
    layers = {}
    for kind in spec_kinds(spec):
        index = _first_layer(spec, kind, model)
        if index is not None:
            layers[kind.label] = index
    dense = [
        k
        for k in spec_kinds(spec)
        if k.subblock("ffn") is not None and not kind_overrides(k, "ffn.moe")
    ]
    moe = [k for k in spec_kinds(spec) if kind_overrides(k, "ffn.moe")]
    kv = [
        k
        for k in spec_kinds(spec)
        if k.subblock("attention") is not None and not kind_overrides(k, "attention.mamba")
    ]
    ffn, ffn_reason = _per_kinds(
        spec, dense, layers, "no layer kind has a dense FFN subblock",
        lambda k, i: _ffn_layer(spec, k, model, text, vocab, i),
    )  # fmt: skip
    kv_heads, kv_reason = _per_kinds(
        spec, kv, layers, "no layer kind has an attention subblock with keys and values",
        lambda k, i: _kv_layer(spec, k, model, text, vocab, i),
    )  # fmt: skip
    experts, experts_reason = _per_kinds(
        spec, moe, layers, "no layer kind has experts",
        lambda k, i: _experts_layer(spec, k, model, config, i),
    )  # fmt: skip
    return Pruning(ffn, kv_heads, ffn_reason, kv_reason, experts, experts_reason)


def _per_kinds(spec, kinds, layers, none_reason, infer_one):
    """One layer descriptor for `kinds`: each kind's own, all equal (evidence aside)."""
    if not kinds:
        return None, none_reason
    found = []
    for kind in kinds:
        if kind.label not in layers:
            continue  # a kind the tiny default config does not build: other configs' layers
        layer, reason = infer_one(kind, layers[kind.label])
        if layer is None:
            prefix = f"{kind.label}: " if len(spec_kinds(spec)) > 1 else ""
            return None, prefix + reason
        found.append(layer)
    if not found:
        return None, (
            "the layer kinds with this subblock are built only by other configs than the "
            "tiny default one (not traced)"
        )
    plain = {dataclasses.replace(f, evidence=()) for f in found}
    if len(plain) > 1:
        return None, "the layer kinds that have this subblock name its modules differently"
    return found[0], ""


def _width_override(kind, attr: str):
    for o in kind_overrides(kind):
        if o.block_config_attr == attr:
            return o
    return None


def _ffn_layer(spec, kind, model, text, vocab, index):
    core_attr = _single_core(kind, "ffn")
    width = _width_override(kind, "ffn.intermediate_size")
    if core_attr is None or width is None:
        return None, "the FFN subblock has no single core module with a width override"
    width_field = width.config_field
    width = getattr(text, width_field, None)
    layer_path = f"{spec_layers(spec)[0]}.{index}"
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = _Flow(model, core, vocab)
    if not flow.linears:
        return None, (
            f"{core_attr} holds no nn.Linear (Model Optimizer's mixins slice nn.Linear weights; "
            "a Conv1D stores them transposed)"
        )
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if len(producers) != 1 or not readers:
        return None, (
            f"{core_attr}: no single linear produces its output ({', '.join(producers) or 'none'})"
            " or none reads its input"
        )
    down = producers[0]
    others = sorted(set(flow.linears) - set(readers) - {down})
    if others:
        return None, f"{core_attr}: linears {others} neither read its input nor produce its output"
    lins = flow.linears
    measured = ""
    if width is None:  # the default leaves it to the modeling code: the width down reads
        width, measured = (
            lins[down].in_features,
            f" (None in the config: {down} reads {lins[down].in_features})",
        )
    bad = [n for n in readers if lins[n].out_features != width]
    if bad or lins[down].in_features != width:
        return None, (
            f"{core_attr}: the projections' widths do not all equal config.{width_field}={width} "
            f"(a fused projection, say), so rows cannot be pruned by the FFN width"
        )
    evidence = (
        f"traced forward of a tiny model: {', '.join(readers)} read {core_attr}'s input and "
        f"output config.{width_field} features{measured}; {down} produces {core_attr}'s output",
    )
    stack = spec_layers(spec)[0]
    return (
        FFNLayer(
            down_proj_name=f"{core_attr}.{down}",
            ffn_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            linear_weight_names=tuple(sorted([down, *readers])),
            evidence=evidence,
        ),
        "",
    )


def _kv_layer(spec, kind, model, text, vocab, index):
    import torch

    core_attr = _single_core(kind, "attention")
    kv_override = _width_override(kind, "attention.num_key_value_heads")
    if core_attr is None or kv_override is None:
        return None, "the attention subblock has no single core module with a KV-heads override"
    layer_path = f"{spec_layers(spec)[0]}.{index}"
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = _Flow(model, core, vocab)
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if not flow.linears:
        return None, (
            f"{core_attr} holds no nn.Linear (Model Optimizer's mixins slice nn.Linear weights; "
            "a Conv1D stores them transposed)"
        )
    if len(readers) != 3 or len(producers) != 1:
        return None, (
            f"{core_attr}: {len(readers)} projection(s) read its input ({', '.join(readers)}), "
            f"{len(producers)} produce(s) its output, not three separate q, k and v and one o; "
            "Model Optimizer's KV-heads mixin slices q, k, v and o as separate tensors"
        )
    o = producers[0]
    kv_field = kv_override.config_field
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, kv_field, None)
    smaller = [d for d in range(1, (heads or 0) + 1) if heads % d == 0 and d != kv]
    if not smaller:
        return None, f"cannot change config.{kv_field} to tell q from k and v"
    try:
        changed_model, _ = _tiny(spec, **{kv_field: smaller[0]})
    except Exception as exc:
        return None, f"a tiny model with another {kv_field} does not build: {exc}"
    changed_core = changed_model.get_submodule(f"{layer_path}.{core_attr}")
    follows = [
        n
        for n in readers
        if changed_core.get_submodule(n).weight.shape != core.get_submodule(n).weight.shape
    ]
    if len(follows) != 2:
        return None, f"config.{kv_field} resizes {follows}, not exactly two of {readers}"
    (q,) = [n for n in readers if n not in follows]
    q_out = core.get_submodule(q).weight.shape[0]
    o_in = core.get_submodule(o).weight.shape[1]
    if q_out != o_in:  # Qwen3-Next: q_proj also computes the output gate
        return None, (
            f"{core_attr}.{q} outputs {q_out} values, {o} reads {o_in}: the query projection "
            "holds more than the queries (an output gate), and Model Optimizer's KV-heads mixin "
            "would slice its rows as query heads"
        )
    base = flow.inputs[o]
    linear_in_v = []
    for n in follows:
        scaled = _Flow(model, core, vocab, scale=n)
        if torch.allclose(scaled.inputs[o], 2 * base, rtol=1e-4, atol=1e-6):
            linear_in_v.append(n)
    if len(linear_in_v) != 1:
        return None, f"cannot tell v from k: doubling {linear_in_v} doubles {o}'s input"
    v = linear_in_v[0]
    (k,) = [n for n in follows if n != v]
    evidence = (
        f"traced forward of a tiny model: {q}, {k}, {v} read {core_attr}'s input, {o} produces "
        f"its output; config.{kv_field} resizes {k} and {v}; doubling {v}'s output doubles "
        f"{o}'s input (attention is linear in v)",
    )
    stack = spec_layers(spec)[0]
    return (
        KVHeadsLayer(
            o_proj_name=f"{core_attr}.{o}",
            attn_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            qkvo_weight_names=(q, k, v, o),
            evidence=evidence,
        ),
        "",
    )


def _experts_layer(spec, kind, model, config, index):
    """Model Optimizer's expert removal keeps some experts of a layer: it slices the router's
    rows and the experts' tensors (per expert, or along the first dimension of fused tensors).

    From a probe build with two more experts (the kind's expert-count field): the tensors of the
    MoE module whose shape changes are the router's and the experts'. Fused experts: tensors
    whose first dimension is the expert count, and only that dimension changes; per-expert: the
    tensors below the nn.ModuleList whose length is the expert count. The router is the module
    of the remaining changed tensors whose input is the MoE module's input and whose output (its
    first element, as Model Optimizer's voting hooks read it) holds one logit per expert; its
    2-D tensors are its weights, its 1-D ones its biases. Anything else that changes with the
    count (a tensor sliced along another dimension) and there is no descriptor."""
    import torch
    from torch import nn

    core_attr = _single_core(kind, "ffn")
    count = _width_override(kind, "ffn.moe.num_local_experts")
    if core_attr is None or count is None:
        return None, "the FFN subblock has no single core module with an expert-count override"
    text = config.get_text_config()
    field = count.config_field
    experts = getattr(text, field)
    stack = spec_layers(spec)[0]
    path = f"{stack}.{index}.{core_attr}"
    core = model.get_submodule(path)
    try:
        more, _ = _tiny(spec, **{field: experts + 2})
    except Exception as exc:
        return None, f"a tiny model with another {field} does not build: {exc}"
    before = {k: tuple(v.shape) for k, v in core.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in more.get_submodule(path).state_dict().items()}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    lists = [
        n
        for n, m in core.named_modules()
        if n and isinstance(m, nn.ModuleList) and len(m) == experts
    ]
    if len(lists) > 1:
        return None, f"{core_attr}: several module lists of {experts} modules ({lists})"
    experts_path = lists[0] if lists else None
    below_list = {k for k in changed if experts_path and k.startswith(f"{experts_path}.")}
    owners = sorted({k.rpartition(".")[0] for k in changed if k not in below_list})
    # the router: the module among the owners of changed tensors that reads the MoE module's
    # input and outputs one logit per expert (its first output, as the voting hooks read it)
    seen: dict[str, dict] = {o: {} for o in owners}

    def hook_for(name):
        def hook(_m, args, kwargs, output):
            seen[name].setdefault("in", args[0] if args else next(iter(kwargs.values()), None))
            seen[name].setdefault("out", output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def core_hook(_m, args, kwargs, output):
        seen.setdefault("", {}).setdefault("in", args[0] if args else kwargs.get("hidden_states"))

    hooks = [core.register_forward_hook(core_hook, with_kwargs=True)]
    for o in owners:
        hooks.append(core.get_submodule(o).register_forward_hook(hook_for(o), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(8).unsqueeze(0) % text.vocab_size)
    finally:
        for h in hooks:
            h.remove()
    core_in = seen.get("", {}).get("in")

    def reads_input(x) -> bool:
        return (
            torch.is_tensor(x)
            and torch.is_tensor(core_in)
            and x.shape[-1] == core_in.shape[-1]
            and torch.equal(x.reshape(-1, x.shape[-1]), core_in.reshape(-1, core_in.shape[-1]))
        )

    routers = [
        o
        for o in owners
        if reads_input(seen[o].get("in"))
        and torch.is_tensor(seen[o].get("out"))
        and seen[o]["out"].shape[-1] == experts
    ]
    if len(routers) != 1:
        return None, (
            f"{core_attr}: {len(routers)} module(s) among those config.{field} resizes "
            f"({', '.join(owners) or 'none'}) read its input and output one logit per expert, "
            "not one router"
        )
    (router_path,) = routers

    def one_row_per_expert(k) -> bool:
        rows = before.get(k, (None,))[:1], after.get(k, (None,))[:1]
        return rows == ((experts,), (experts + 2,)) and before[k][1:] == after[k][1:]

    rest = [k for k in changed if k.rpartition(".")[0] == router_path]
    for k in rest:
        if not one_row_per_expert(k):
            return None, f"{core_attr}: {k} does not have one row per expert"
    others = [k for k in changed if k not in rest and k not in below_list]
    # a per-expert bias of the routing kept beside the router (DeepSeek-style score correction
    # on the MoE module): one value per expert, outside the module that holds the experts
    matrices = {k.rpartition(".")[0] for k in others if len(before.get(k, ())) >= 2}
    routing = [
        k
        for k in others
        if len(before.get(k, ())) == 1
        and one_row_per_expert(k)
        and k.rpartition(".")[0] not in matrices
    ]
    rest += routing
    others = [k for k in others if k not in routing]
    if experts_path:
        if others:
            return None, f"{core_attr}: {others} change with config.{field} too"
        per_expert = sorted(
            k[len(experts_path) + 3 :] for k in before if k.startswith(f"{experts_path}.0.")
        )
        one = {n: before[f"{experts_path}.0.{n}"] for n in per_expert}
        fused: list[str] = []
        shape = "per expert"
    else:
        holders = {k.rpartition(".")[0] for k in others}
        if len(holders) != 1:
            return None, f"{core_attr}: no single module holds the experts as fused tensors"
        (experts_path,) = holders
        fused = [k for k in before if k.rpartition(".")[0] == experts_path]
        for k in fused:
            if (
                k not in after
                or before[k][:1] != (experts,)
                or after[k]
                != (
                    experts + 2,
                    *before[k][1:],
                )
            ):
                return None, (
                    f"{core_attr}: {k} does not hold the experts along its first dimension"
                )
        per_expert, one = [], {}
        shape = "fused"
    weights = tuple(sorted(k for k in rest if len(before[k]) >= 2))
    biases = tuple(sorted(k for k in rest if len(before[k]) == 1))
    evidence = (
        f"probe: config.{field} + 2 resizes {', '.join(changed)} of {core_attr}",
        f"traced forward of a tiny model: {router_path} reads {core_attr}'s input and outputs "
        f"{experts} logits, one per expert; the experts are {shape} ({experts_path})",
    )
    return (
        ExpertsLayer(
            target_name=f"{core_attr}.{router_path}",
            moe_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            expert_prefix_name=f"{experts_path}.{{expert_idx}}" if shape == "per expert" else "",
            router_weights=weights,
            router_biases=biases,
            expert_weights=tuple(n for n in per_expert if len(one[n]) >= 2),
            expert_biases=tuple(n for n in per_expert if len(one[n]) == 1),
            is_fused_experts=shape == "fused",
            fused_expert_weights=tuple(fused) if shape == "fused" else (),
            evidence=evidence,
        ),
        "",
    )


def check_pruning_names(p: Pruning) -> None:
    for layer in (p.ffn, p.kv_heads, p.experts):
        if layer is None:
            continue
        for value in dataclasses.astuple(layer)[:-1]:
            if isinstance(value, bool):
                continue
            for item in value if isinstance(value, tuple) else (value,):
                if item == "":
                    continue
                plain = item.replace("{layer_idx}", "0").replace("{expert_idx}", "0")
                if not is_dotted_path(plain, allow_digits=True):
                    raise PuzzleGenError(f"refusing to render the module name {item!r}")


# -- the descriptor for Model Optimizer --------------------------------------------------------


def _docline(text: str) -> str:
    """One line of free text made safe inside a triple-quoted docstring."""
    text = " ".join(str(text).split()).rstrip(".")
    return "".join(c for c in text if c.isprintable()).replace("\\", "/").replace('"', "'")


@dataclass(frozen=True)
class ModeloptView:
    """What templates/modelopt_descriptor.py.j2 reads (the `modelopt` template variable)."""

    prefix: str  # the descriptor class name without ModelDescriptor
    exports: tuple[str, ...]  # the layer descriptor classes, for __all__
    pruning: Pruning
    ffn_mixin_key: str
    kv_mixin_key: str
    experts_mixin_key: str
    pruning_notes: tuple[str, ...]  # docstring lines: why a mixin is missing
    ffn_evidence: str
    kv_evidence: str
    experts_evidence: str
    dummy_returns_tuple: bool
    dummy_attributes: tuple[str, ...]
    rebuild_buffers: bool  # write _rebuild_buffers into the module
    pass_residual: bool  # write PassResidual into the module
    move_to_sole_subblock: bool  # write _move_to_sole_subblock into the module


def descriptor_target(spec: DescriptorSpec, layout: str, pruning: Pruning, command_line: str):
    """The render.Target of a Model Optimizer descriptor: its import lines (Model Optimizer,
    transformers and torch only), what our runtime has and Model Optimizer does not written
    inline (the buffer rebuild, PassResidual, the move of a layer's tensors to its sole
    subblock), and the pruning layer descriptors."""
    from .render import Target

    check_pruning_names(pruning)
    names = names_for(spec, MODELOPT)
    first: dict[str, frozenset[str]] = {}
    exports = []
    if pruning.ffn:
        exports.append(f"{names.prefix}FFNIntermediateLayerDescriptor")
        first["pruning.ffn_intermediate_pruning_mixin"] = frozenset(
            {"FFNIntermediateLayerDescriptor", "FFNIntermediatePruningMixIn"}
        )
    if pruning.kv_heads:
        exports.append(f"{names.prefix}KVHeadsLayerDescriptor")
        first["pruning.kv_heads_pruning_mixin"] = frozenset(
            {"KVHeadsLayerDescriptor", "KVHeadsPruningMixIn"}
        )
    if pruning.experts:
        exports.append(f"{names.prefix}ExpertRemovalLayerDescriptor")
        first["pruning.expert_removal_pruning_mixin"] = frozenset(
            {"ExpertRemovalLayerDescriptor", "ExpertRemovalPruningMixIn"}
        )
    notes = []
    if pruning.ffn_reason:
        notes.append(f"No FFN-intermediate pruning: {_docline(pruning.ffn_reason)}.")
    if pruning.kv_reason:
        notes.append(f"No KV-heads pruning: {_docline(pruning.kv_reason)}.")
    if pruning.experts_reason:
        notes.append(f"No expert removal: {_docline(pruning.experts_reason)}.")
    returns_tuple, attributes = spec_dummy_block(spec)
    for a in attributes:
        if not is_identifier(a):
            raise PuzzleGenError(f"refusing to render the layer attribute {a!r}")
    has_rebuild = spec_rebuilds_buffers(spec)
    pass_residual = "PassResidual" in spec_no_op_stand_ins(spec)
    view = ModeloptView(
        prefix=names.prefix,
        exports=tuple(exports),
        pruning=pruning,
        ffn_mixin_key=FFN_MIXIN_KEY,
        kv_mixin_key=KV_MIXIN_KEY,
        experts_mixin_key=EXPERTS_MIXIN_KEY,
        pruning_notes=tuple(notes),
        ffn_evidence=_docline("; ".join(pruning.ffn.evidence)) if pruning.ffn else "",
        kv_evidence=_docline("; ".join(pruning.kv_heads.evidence)) if pruning.kv_heads else "",
        experts_evidence=(_docline("; ".join(pruning.experts.evidence)) if pruning.experts else ""),
        dummy_returns_tuple=returns_tuple,
        dummy_attributes=attributes,
        rebuild_buffers=has_rebuild,
        pass_residual=pass_residual,
        move_to_sole_subblock=spec_moves_followers(spec),
    )
    return Target(
        module_for=lambda sub: module_for(sub, MODELOPT, layout),
        third_party={"transformers": frozenset({"PreTrainedModel"})} if has_rebuild else {},
        first_party=first,
        stdlib=("from dataclasses import dataclass, field",) if exports else (),
        command=command_line,
        inline=frozenset({"rebuild_buffers", "PassResidual", "move_to_sole_subblock"}),
        template_vars={"registration_name": names.registration, "modelopt": view},
    )


# -- planning the files of one target / layout -------------------------------------------------


def plan_target(
    targets: list, out: str, out_flag: str | None, target: str, layout: str, progress
) -> dict:
    """Every file `generate --target/--layout` writes, rendered in memory. Nothing here touches
    generated/'s table or coverage: those describe the default target."""
    from pathlib import Path

    from . import render
    from .infer import infer

    target = check_target(target, layout)
    out_dir = Path(out) / "models" if layout == MODELOPT_TREE else Path(out)
    files: dict[Path, str] = {}
    for i, argument in enumerate(targets, 1):
        label = getattr(argument, "argument", None) or getattr(argument, "model_type", argument)
        progress(f"[{i}/{len(targets)}] {label}: inferring")
        spec = infer(argument)
        names = names_for(spec, target)
        tspec = target_spec(spec, target)
        cmd = command(spec, out_flag, target, layout)
        model_type = spec_names(spec)[0]
        if target == MODELOPT:
            progress(f"    {model_type}: tracing a tiny model for pruning layer descriptors")
            descriptor_as = descriptor_target(spec, layout, infer_pruning(spec), cmd)
        else:
            descriptor_as = render.Target(command=cmd)
        pkg = out_dir / names.package
        files[pkg / f"{render.descriptor_module(tspec)}.py"] = render.render_descriptor(
            tspec, out_flag, descriptor_as
        )
        converter = None
        try:
            text = render_converter(spec, target=target, layout=layout, command_line=cmd)
            converter = converter_module(spec, target)
            files[pkg / f"{converter}.py"] = text
        except PuzzleGenError as exc:
            progress(f"    {exc}")
        lm_class, modeling_module, version = spec_source(spec)
        files[pkg / "__init__.py"] = render._format(
            render._env()
            .get_template("modelopt_init.py.j2")
            .render(
                **render._header(cmd, modeling_module, version),
                model_type=model_type,
                registration_name=names.registration,
                module=render.descriptor_module(tspec),
                converter=converter,
            ),
            f"package of {model_type}",
        )
        if layout == MODELOPT_TREE:
            progress(
                f"    {model_type}: add `from .{names.package} import *` to "
                "modelopt/torch/puzzletron/anymodel/models/__init__.py"
            )
    return files
