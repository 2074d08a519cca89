"""Targets, layouts, converters and pruning layer descriptors for NVIDIA Model Optimizer.

A descriptor is rendered for one *target*, the package its import lines name:

- ``puzzletron``: this project's runtime (``puzzletron_runtime``), what ``generated/`` holds;
- ``modelopt``: Model Optimizer's own API (``modelopt.torch.puzzletron``), the same descriptor
  with other import lines, plus what Model Optimizer has and our runtime does not (a ``Converter``
  base class and ``ConverterFactory`` registration, pruning layer descriptors and
  ``pruning_mixins()``).

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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

# our runtime's submodule -> (Model Optimizer absolute module, relative from models/<name>/)
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
}

# pruning_mixins() keys: Model Optimizer's own descriptors use "kv_heads" and
# "experts_removal"; FFN width pruning has no key there yet, so we name it after its mixin.
FFN_MIXIN_KEY = "ffn_intermediate"
KV_MIXIN_KEY = "kv_heads"


def check_target(target: str, layout: str) -> str:
    """The effective target: modelopt-tree implies modelopt; refuse a contradiction."""
    if target not in TARGETS:
        raise PuzzleGenError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise PuzzleGenError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == MODELOPT_TREE and target != MODELOPT:
        raise PuzzleGenError("--layout modelopt-tree writes Model Optimizer files: use --target modelopt")
    return target


def module_for(submodule: str, target: str, layout: str = PACKAGE) -> str:
    """The module a generated file imports for our runtime's `submodule` under `target`."""
    if target == PUZZLETRON:
        if submodule.startswith("pruning.") or submodule == "converter":
            raise PuzzleGenError(f"{RUNTIME} has no {submodule} module")
        return f"{RUNTIME}.{submodule}"
    if submodule not in _MODULES:
        raise PuzzleGenError(
            f"Model Optimizer has no counterpart of {RUNTIME}.{submodule}: this descriptor "
            "cannot be rendered for the modelopt target"
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
    registration = registration_name(spec.model_type, target)
    cls = spec.class_name
    if not cls.endswith("ModelDescriptor"):
        raise PuzzleGenError(f"descriptor class {cls!r} does not end in ModelDescriptor")
    package = spec.package
    if registration != spec.model_type:
        package = f"{spec.package}{TAKEN_SUFFIX}"
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


def check_renderable(spec: DescriptorSpec, target: str) -> None:
    """Refuse what Model Optimizer's API cannot express (one line, naming why). Attributes the
    model loop reads are set on its DummyBlock after construction (see the template)."""
    if target == MODELOPT and spec.dummy_block.returns_tuple:
        raise PuzzleGenError(
            f"{spec.model_type}: the model loop indexes a layer's output as a tuple, and Model "
            "Optimizer's DummyBlock returns a tensor"
        )


# -- converter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConverterField:
    """One BlockConfig field the converter reads from the (text) config."""

    path: tuple[str, ...]  # e.g. ("attention", "num_key_value_heads") or ("ffn", "moe", "...")
    config_field: str
    read_at: str


def converter_fields(spec: DescriptorSpec) -> tuple[ConverterField, ...]:
    """The converter reads every config field the overrides write back, so block configs fed
    back through `block_config_to_layer_overrides` rebuild the config it read them from.

    Raises when the spec lacks a size a BlockConfig needs (no override for a subblock)."""
    fields = []
    for sb in (spec.attention, spec.ffn):
        if not sb.overrides:
            raise PuzzleGenError(
                f"{spec.model_type}: no converter: the {sb.kind} subblock reads no size from "
                "the config (no override was inferred)"
            )
        for o in sb.overrides:
            path = tuple(o.block_config_attr.split("."))
            if not all(is_identifier(p) for p in path) or not is_identifier(o.config_field):
                raise PuzzleGenError(f"refusing to render the override {o}")
            fields.append(ConverterField(path, o.config_field, o.read_at))
    return tuple(fields)


def block_config_tree(fields: tuple[ConverterField, ...]) -> dict[str, Any]:
    """{"attention": {"num_key_value_heads": "num_key_value_heads"}, "ffn": {...,"moe": {...}}}:
    BlockConfig's nesting with the config field each leaf reads."""
    tree: dict[str, Any] = {}
    for f in fields:
        node = tree
        for part in f.path[:-1]:
            node = node.setdefault(part, {})
        node[f.path[-1]] = f.config_field
    return tree


# -- pruning layer descriptors ---------------------------------------------------------------


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
class Pruning:
    ffn: FFNLayer | None
    kv_heads: KVHeadsLayer | None
    ffn_reason: str  # why there is no FFN layer descriptor ("" when there is one)
    kv_reason: str


def _single_core(spec: DescriptorSpec, kind: str) -> str | None:
    sb = spec.attention if kind == "attention" else spec.ffn
    cores = [r.attr for r in sb.replacements if r.replacement == "MatchingZeros"]
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
        hooks = []

        def core_hook(_m, args, kwargs, output):
            hs = args[0] if args else kwargs.get("hidden_states")
            self.core_in = hs
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

    source = resolve(spec.model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls, **extra)
    import torch

    torch.manual_seed(0)
    return build_model(source.causal_lm_cls, config, "cpu"), config


def infer_pruning(spec: DescriptorSpec) -> Pruning:
    """FFN-intermediate and KV-heads layer descriptors from data flow on a tiny model.

    FFN: the core's linears are either input projections (read the core's input, output the
    FFN width) or the single output projection (its output is the core's output, its input the
    FFN width); anything else (a fused gate/up tensor twice the width, a linear in between) and
    Model Optimizer's mixin, which slices rows of inputs and columns of the output by the width,
    would cut the wrong rows: no descriptor.
    KV heads: exactly three linears read the attention's input and one produces its output; the
    two whose shapes follow the KV-head field are k and v, and v is the one whose doubled output
    doubles the output projection's input exactly (attention is linear in v, not in k). A fused
    q/k/v projection is one tensor the mixin cannot address by name: no descriptor.
    """
    try:
        model, config = _tiny(spec)
    except Exception as exc:
        reason = f"the tiny model does not build: {type(exc).__name__}: {exc}"
        return Pruning(None, None, reason, reason)
    text = config.get_text_config()
    vocab = text.vocab_size
    layer_path = f"{spec.layer_stack}.0"
    ffn, ffn_reason = _ffn_layer(spec, model, text, vocab, layer_path)
    kv, kv_reason = _kv_layer(spec, model, text, vocab, layer_path)
    return Pruning(ffn, kv, ffn_reason, kv_reason)


def _ffn_layer(spec, model, text, vocab, layer_path):
    core_attr = _single_core(spec, "ffn")
    if core_attr is None or not spec.ffn.overrides:
        return None, "the FFN subblock has no single core module with a width override"
    width_field = spec.ffn.overrides[0].config_field
    width = getattr(text, width_field, None)
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = _Flow(model, core, vocab)
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if len(producers) != 1 or not readers:
        return None, (
            f"{core_attr}: no single linear produces its output ({producers}) or none reads "
            f"its input"
        )
    down = producers[0]
    others = sorted(set(flow.linears) - set(readers) - {down})
    if others:
        return None, f"{core_attr}: linears {others} neither read its input nor produce its output"
    lins = flow.linears
    bad = [n for n in readers if lins[n].out_features != width]
    if bad or lins[down].in_features != width:
        return None, (
            f"{core_attr}: the projections' widths do not all equal config.{width_field}={width} "
            f"(a fused projection, say), so rows cannot be pruned by the FFN width"
        )
    evidence = (
        f"traced forward of a tiny model: {', '.join(readers)} read {core_attr}'s input and "
        f"output config.{width_field} features; {down} produces {core_attr}'s output",
    )
    return (
        FFNLayer(
            down_proj_name=f"{core_attr}.{down}",
            ffn_prefix_name=f"{spec.layer_stack}.{{layer_idx}}.{core_attr}",
            linear_weight_names=tuple(sorted([down, *readers])),
            evidence=evidence,
        ),
        "",
    )


def _kv_layer(spec, model, text, vocab, layer_path):
    core_attr = _single_core(spec, "attention")
    if core_attr is None or not spec.attention.overrides:
        return None, "the attention subblock has no single core module with a KV-heads override"
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = _Flow(model, core, vocab)
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if len(readers) != 3 or len(producers) != 1:
        return None, (
            f"{core_attr}: {len(readers)} projection(s) read its input ({', '.join(readers)}), "
            "not three separate q, k and v; Model Optimizer's KV-heads mixin slices q, k and v "
            "as separate tensors, so a fused projection has no descriptor"
        )
    o = producers[0]
    kv_field = spec.attention.overrides[0].config_field
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
        return None, f"{kv_field} resizes {follows}, not exactly two of {readers}"
    (q,) = [n for n in readers if n not in follows]
    base = flow.inputs[o]
    linear_in_v = []
    for n in follows:
        scaled = _Flow(model, core, vocab, scale=n)
        import torch

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
    return (
        KVHeadsLayer(
            o_proj_name=f"{core_attr}.{o}",
            attn_prefix_name=f"{spec.layer_stack}.{{layer_idx}}.{core_attr}",
            qkvo_weight_names=(q, k, v, o),
            evidence=evidence,
        ),
        "",
    )


def check_pruning_names(p: Pruning) -> None:
    for layer in (p.ffn, p.kv_heads):
        if layer is None:
            continue
        for value in dataclasses.astuple(layer)[:-1]:
            for item in value if isinstance(value, tuple) else (value,):
                plain = item.replace(".{layer_idx}.", ".0.")
                if not is_dotted_path(plain, allow_digits=True):
                    raise PuzzleGenError(f"refusing to render the module name {item!r}")


# -- planning the files of one target / layout -----------------------------------------------


def command(model_type: str, out: str | None, target: str, layout: str) -> str:
    flags = f" --target {target}" if target != PUZZLETRON else ""
    flags += f" --layout {layout}" if layout != PACKAGE else ""
    return f"puzzle-gen generate {model_type}{flags}" + (f" --out {out}" if out else "")


def plan_target(
    model_types: list[str], out: str, out_flag: str | None, target: str, layout: str, progress
) -> dict:
    """Every file `generate --target/--layout` writes, rendered in memory. Nothing here touches
    generated/'s table or coverage: those describe the default target."""
    from functools import partial
    from pathlib import Path

    from . import render
    from .infer import infer

    target = check_target(target, layout)
    modules = partial(module_for, target=target, layout=layout)
    out_dir = Path(out) / "models" if layout == MODELOPT_TREE else Path(out)
    files: dict[Path, str] = {}
    for i, model_type in enumerate(model_types, 1):
        progress(f"[{i}/{len(model_types)}] {model_type}: inferring")
        spec = infer(model_type)
        check_renderable(spec, target)
        names = names_for(spec, target)
        tspec = target_spec(spec, target)
        cmd = command(model_type, out_flag, target, layout)
        pruning = None
        if target == MODELOPT:
            progress(f"    {model_type}: tracing a tiny model for pruning layer descriptors")
            pruning = infer_pruning(spec)
            check_pruning_names(pruning)
        pkg = out_dir / names.package
        files[pkg / f"{render.descriptor_module(tspec)}.py"] = render.render_descriptor(
            tspec,
            out_flag,
            module_for=modules if target != PUZZLETRON else render._runtime_module,
            registration_name=names.registration,
            pruning=pruning,
            command=cmd,
        )
        files[pkg / f"{render.converter_module(tspec)}.py"] = render.render_converter(
            tspec,
            out_flag,
            module_for=modules if target != PUZZLETRON else render._runtime_module,
            registration_name=names.registration,
            converter_class=names.converter_class,
            command=cmd,
        )
        files[pkg / "__init__.py"] = render._format(
            render._env()
            .get_template("modelopt_init.py.j2")
            .render(
                **render._header(cmd, spec.modeling_module, spec.transformers_version),
                spec=tspec,
                registration_name=names.registration,
                module=render.descriptor_module(tspec),
                converter=render.converter_module(tspec),
            ),
            f"package of {model_type}",
        )
        if layout == MODELOPT_TREE:
            progress(
                f"    {model_type}: add `from .{names.package} import *` to "
                "modelopt/torch/puzzletron/anymodel/models/__init__.py"
            )
    return files
