"""The probe of a checkpoint whose own code is parsed and never imported (no --trust-remote-code).

`static_source` turns such a checkpoint into a ModelSource whose classes are stand-ins
(generator/static_build.py) and whose config is built from config.json data by transformers' own
config class (the nearest one the parsed config class derives from); `StaticProbe` is the Probe
of that source. It builds the stand-in tree at the checkpoint's config and holds it against the
safetensors headers, tensor by tensor: a shape the parse computes must be the checkpoint's, a
tensor the parse builds must be in the checkpoint, and a tensor whose shape the parse cannot
compute takes the header's shape. The existing inference (generator/infer.py) then runs on it
unchanged, except for the steps that need a real build, which are replaced by static
equivalents or weaker evidence, each stated where it is used:

- the traced forward of a tiny model: what each child returns comes from the returns of its
  own parsed `forward` (a tuple literal's length), checked against the call site;
- override probes: the same stand-in built with the field changed (shapes the parse computes),
  starting from the build the headers confirmed; whether transformers' weight init would reject
  a per-layer change cannot be tried;
- the buffer rebuild check: the buffers a meta build leaves empty are those the parsed code
  registers outside the state dict; that `_init_weights` rebuilds them is not tried here (the
  runtime's load_model fails naming any buffer it leaves empty);
- the names save_pretrained writes: the checkpoint's own tensor names (transformers has no
  conversion mapping for a model type it does not know).

What the parse cannot decide stops generation with one line naming it (StaticGap).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libcst as cst
import torch
from torch import nn

from .analysis import layer_flow
from .analysis.source_index import dotted
from .checkpoint import CONFIG, Checkpoint, CheckpointInputError, show
from .errors import InferenceError
from .parsed_source import ParsedCode, StaticSourceIndex, gap
from .probe import CallTrace, Probe, build_model, layer_children
from .spec import RebuiltBuffers
from .static_build import StaticBuilder
from .static_config import checkpoint_config, config_class
from .static_returns import UNSET, returned_size
from .static_standins import StandIn, is_pretrained, require_known

_SAFE_MODEL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class StaticCode:
    """What a ModelSource of parsed code carries: the parse, its index and the builder."""

    code: ParsedCode
    index: StaticSourceIndex
    builder: StaticBuilder

    def probe(self, source) -> "StaticProbe":
        return StaticProbe(source)


def static_source(ckpt: Checkpoint, custom, arg: str):
    """A ModelSource for `ckpt`, whose model type only its own (parsed) code defines."""
    import transformers

    from .source import ModelSource

    transformers_root = Path(transformers.__file__).resolve().parent
    config_path = ckpt.directory / CONFIG
    model_type = ckpt.model_type
    if not _SAFE_MODEL_TYPE.match(model_type):
        raise CheckpointInputError(f"{config_path}: model_type {model_type!r} is not a plain name")

    def display(path) -> str:
        p = Path(path).resolve()
        try:
            return f"transformers/{p.relative_to(transformers_root).as_posix()}"
        except ValueError:
            return p.name

    index = StaticSourceIndex(display=display)
    code = ParsedCode(custom.files, ckpt.directory, index)
    builder = StaticBuilder(code, index)
    if "AutoConfig" not in custom.classes:
        raise CheckpointInputError(
            f"{config_path}: auto_map names no AutoConfig, so the config class is unknown"
        )
    config_file, config_name = custom.classes["AutoConfig"]
    model_file, model_name = custom.classes["AutoModelForCausalLM"]
    config_node = code.class_named(Path(config_file).stem, config_name)
    model_node = code.class_named(Path(model_file).stem, model_name)
    config_cls = config_class(code, builder, config_node)
    config = checkpoint_config(ckpt, code, builder, config_node, config_cls)
    causal_lm_cls = builder.type_for(model_node)
    if not is_pretrained(causal_lm_cls):
        raise gap(
            f"the causal LM class {model_name}",
            "it does not derive from transformers' PreTrainedModel",
            model_node.where(),
        )
    return ModelSource(
        model_type=model_type,
        config_cls=config_cls,
        causal_lm_cls=causal_lm_cls,
        modeling_module=model_node.module.remote_name,
        modeling_file=Path(model_file).resolve(),
        transformers_root=transformers_root,
        config=config,
        checkpoint=ckpt,
        custom_code=custom,
        trust_remote_code=False,
        argument=arg,
        static=StaticCode(code, index, builder),
    )


# -- the probe ------------------------------------------------------------------------------------
class StaticProbe(Probe):
    """A Probe whose model is the static build of parsed code, confirmed by the checkpoint's
    safetensors headers (see the module docstring for what replaces each real build)."""

    is_static = True
    trace_evidence = (
        "static: its parsed forward's returns agree with the call site (nothing was run)"
    )

    def __init__(self, source):
        self.builder = source.static.builder
        with self.builder.lenient():  # the headers give what the parse does not compute
            super().__init__(source)
        self.index = source.static.index
        self._reconcile(source.checkpoint)
        self.paths = {id(mod): name for name, mod in self.model.named_modules()}
        self._base_builds: dict = {}

    # -- the build against the headers --------------------------------------------------------
    def _reconcile(self, ckpt: Checkpoint) -> None:
        tensors = ckpt.tensors
        model = self.model
        config_path = ckpt.directory / CONFIG
        for path, module in list(model.named_modules()):
            unknown = module.__dict__.get("_static_unknown", {})
            if "" in unknown:  # an unknown leaf: its tensors are the checkpoint's
                prefix = f"{path}."
                for name, info in tensors.items():
                    if name.startswith(prefix):
                        _put(module, name[len(prefix) :], info)
                module.__dict__.setdefault("_static_filled", unknown.pop(""))
            for name, kind in list(module.__dict__.get("_static_unknown_tensors", {}).items()):
                full = f"{path}.{name}" if path else name
                info = tensors.get(full)
                if info is not None:
                    if name in module._buffers:
                        persistent = name not in module._non_persistent_buffers_set
                        module.register_buffer(name, _meta(info), persistent=persistent)
                    else:
                        module._parameters[name] = nn.Parameter(_meta(info), requires_grad=False)
                    unknown.pop(name, None)
                elif kind == "parameter" or name not in module._non_persistent_buffers_set:
                    raise gap(
                        f"the shape of {full}",
                        f"{unknown.get(name, 'the parsed code')} and the checkpoint has no "
                        "such tensor to read it from",
                    )
        for path, module in model.named_modules():
            for name, why in module.__dict__.get("_static_unknown", {}).items():
                full = f"{path}.{name}" if path else name
                held = [n for n in tensors if n == full or n.startswith(f"{full}.")]
                if name and held:
                    raise gap(
                        f"the module {full}",
                        f"{why}, and the checkpoint holds its tensors ({', '.join(held[:3])}"
                        + (", ..." if len(held) > 3 else "")
                        + ")",
                    )
        # names of one tensor (tied embeddings): the checkpoint holds one of them
        aliases: dict[int, list[str]] = {}
        for n, t in model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(t), []).append(n)
        held = {n for names in aliases.values() if set(names) & set(tensors) for n in names}
        built = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        wrong = [
            f"{show(n)} is {list(tensors[n].shape)} in {tensors[n].file}, the parsed code "
            f"builds {list(shape)}"
            for n, shape in built.items()
            if n in tensors and tuple(tensors[n].shape) != shape
        ]
        if wrong:
            raise CheckpointInputError(
                f"{config_path} contradicts the tensors' shapes (as the checkpoint's parsed code "
                f"builds them from it): {'; '.join(wrong[:12])}"
            )
        missing = [n for n in built if n not in held]
        if missing:
            raise InferenceError(
                "the module tree of the parsed code",
                f"it builds {len(missing)} tensor(s) the checkpoint does not hold: "
                + ", ".join(f"{show(n)} {list(built[n])}" for n in missing[:12]),
            )

    # -- builds -----------------------------------------------------------------------------
    def tiny_config(self, **extra: Any) -> Any:
        """The checkpoint's own config (a meta build of parsed code costs nothing at full size),
        with `extra` changes: the build it describes is the one the headers confirmed."""
        config = copy.deepcopy(self.config)
        target = config.get_text_config()
        for field, value in {**self.tiny_extra, **extra}.items():
            setattr(target, field, value)
        return config

    def tiny_model(self, config: Any | None = None, seed: int = 0) -> nn.Module:
        if config is None and not self.tiny_extra:
            return self.model
        return build_model(self.source.causal_lm_cls, config or self.tiny_config())

    def shape_diff(self, changes: dict[str, Any], layer_path: str) -> dict[str, tuple]:
        what = _what_changes(changes, layer_path)
        base = self._built(layer_path, what)
        changed_config = self.tiny_config()
        target = changed_config.get_text_config()
        for field, value in changes.items():
            setattr(target, field, value)
        try:
            with self.builder.lenient():  # only the layer's shapes matter: checked below
                changed = build_model(self.source.causal_lm_cls, changed_config)
        except InferenceError:
            raise
        except Exception:
            return {}
        require_known(changed, layer_path, what)
        a = {k: tuple(v.shape) for k, v in base.get_submodule(layer_path).named_parameters()}
        b = {k: tuple(v.shape) for k, v in changed.get_submodule(layer_path).named_parameters()}
        return {k: b.get(k, ()) for k in set(a) | set(b) if a.get(k) != b.get(k)}

    def shape_diffs(self, changes: dict[str, Any], layer_paths) -> dict[str, dict[str, tuple]]:
        """`shape_diff` for each of several layers (each a parsed build, checked for what the
        parse cannot compute the way `shape_diff` checks it)."""
        return {p: self.shape_diff(changes, p) for p in layer_paths}

    def _built(self, layer_path: str, fact: str) -> nn.Module:
        """The build at the probe's config, computed by the parse alone: what a changed build is
        compared with (the headers confirmed its shapes where the parse computes them)."""
        key = repr(sorted(self.tiny_extra.items()))  # per-layer lists: not hashable
        if key not in self._base_builds:
            with self.builder.lenient():
                self._base_builds[key] = build_model(self.source.causal_lm_cls, self.tiny_config())
        model = self._base_builds[key]
        require_known(model, layer_path, fact)
        return model

    def attribute_diff(self, changes: dict[str, Any], layer_path: str) -> dict[str, tuple]:
        base = self._built(layer_path, _what_changes(changes, layer_path))
        changed_config = self.tiny_config()
        for field, value in changes.items():
            setattr(changed_config.get_text_config(), field, value)
        try:
            with self.builder.lenient():
                changed = build_model(self.source.causal_lm_cls, changed_config)
        except InferenceError:
            raise
        except Exception:
            return {}

        def numbers(model) -> dict[str, Any]:
            out = {}
            for path, module in model.get_submodule(layer_path).named_modules():
                for attr, value in vars(module).items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        out[f"{path}.{attr}" if path else attr] = value
            return out

        a, b = numbers(base), numbers(changed)
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        if not diff:
            unknown = _unknown_attrs(base.get_submodule(layer_path))
            if unknown:
                raise gap(
                    f"which module keeps config.{', config.'.join(changes)}",
                    "no attribute the parse computes changes, and these are not known: "
                    + "; ".join(unknown[:4]),
                )
        return diff

    def layer_change_fails(self, changes: dict[str, Any], layer_path: str) -> str | None:
        """A real build of a model whose one layer has its own value is not tried. What stands in
        for it: a pretrained model class whose `_init_weights` reads the field from its own
        (whole-model) config would initialise that layer with the other layers' size
        (Nemotron-H's Mamba A_log), so the field is refused as a per-layer size."""
        for cls, func, parsed in self._init_weights():
            for node in _walk_cst(func):
                read = None
                if isinstance(node, cst.Attribute) and (dotted(node) or "").startswith(
                    "self.config."
                ):
                    read = dotted(node)[len("self.config.") :].split(".")[0]
                elif (
                    isinstance(node, cst.Call)
                    and dotted(node.func) == "getattr"
                    and len(node.args) >= 2
                    and dotted(node.args[0].value) == "self.config"
                    and isinstance(node.args[1].value, cst.SimpleString)
                ):
                    read = node.args[1].value.evaluated_value
                if read in changes:
                    return (
                        f"static: {cls}._init_weights ({parsed.where(func)}) reads "
                        f"self.config.{read}, the whole model's value (not tried: nothing was run)"
                    )
        return None

    def _init_weights(self):
        """(class name, FunctionDef, ParsedFile) of the _init_weights of every pretrained model
        class the build holds, as their MROs define it (transformers' own base one excluded)."""
        from transformers import PreTrainedModel

        from .static_standins import method_owner

        seen, out = set(), []
        for module in self.model.modules():
            cls = type(module)
            if not isinstance(module, StandIn) or not is_pretrained(cls._static_mro):
                continue
            owner = method_owner(cls._static_mro, "_init_weights")
            if owner is None or owner is PreTrainedModel or id(owner) in seen:
                continue
            seen.add(id(owner))
            try:
                parsed, name, func = self.index.find_method(cls, "_init_weights")
            except InferenceError:
                continue
            out.append((name, func, parsed))
        return out

    def checkpoint_names(self, model: nn.Module) -> dict[str, str]:
        return {name: name for name in model.state_dict()}

    # -- calls ------------------------------------------------------------------------------
    def trace_layer(self, layer_path: str, units=None) -> dict[str, CallTrace]:
        """What a traced forward would report, read statically: every child the layer's forward
        calls, returning what its own forward's returns say (a tuple literal's length, a
        tensor); where they say nothing, the call site's unpacking stands, unless the call site
        only indexes the result (then its size is unknown)."""
        layer = self.tiny_model().get_submodule(layer_path)  # a variant's own build
        flow = layer_flow.analyze_layer(type(layer), layer, layer_children(layer), self.index)
        out = {}
        for name in flow.called:
            child = layer.get_submodule(name) if name in dict(layer.named_modules()) else None
            size = returned_size(child, self.index) if isinstance(child, nn.Module) else UNSET
            if size is UNSET:
                if flow.indexed.get(name) and flow.arity.get(name) is None:
                    raise gap(
                        f"what {name} returns",
                        f"its call site indexes the result ({flow.sites[name]}) and the returns "
                        f"of {type(child).__name__}.forward do not show a tuple size",
                    )
                size = flow.arity.get(name)
            out[name] = CallTrace(1, size)
        return out

    def called_modules(self, asking: str = "") -> frozenset[str]:
        """A module beside the language model is grouped by whether a text-only forward calls it
        (an encoder of another modality, or a head): that needs the forward run."""
        raise gap(
            f"the weight group of {asking or 'a module beside the language model'}",
            "it sits beside the language model, and whether a text-only forward calls it (an "
            "encoder of another modality) or not needs the code run: pass --trust-remote-code",
        )

    # -- buffers ----------------------------------------------------------------------------
    def static_buffers(self, ctx) -> list[RebuiltBuffers]:
        """Buffers a meta build leaves empty: those not in the checkpoint (registered outside the
        state dict by the parsed code, or by the library modules it builds), owned by the nearest
        pretrained model above them, whose `_init_weights` the runtime calls. Not tried here."""
        names = set(self.source.checkpoint.tensors)
        out = []
        owners = _owners(self.model)
        for path, module in self.model.named_modules():
            empty = [
                n
                for n, b in module._buffers.items()
                if b is not None and (f"{path}.{n}" if path else n) not in names
            ]
            if not empty:
                continue
            owner = owners.get(path)
            if owner is None:
                raise gap(
                    f"how to rebuild {', '.join(empty)} of {path or 'the model'}",
                    "no pretrained model above them has an _init_weights to rebuild them",
                )
            init_class = type(owner).__name__
            evidence = (
                f"static: {type(module).__name__} registers {', '.join(empty)} and the "
                "checkpoint does not hold them, so a meta-device build leaves them empty",
                f"not tried (the code was not run): {init_class}._init_weights is what the "
                "runtime's rebuild_buffers calls; load_model fails naming any buffer it leaves "
                "empty",
            )
            out.append(RebuiltBuffers(path, tuple(empty), init_class, evidence))
            ctx.fact(f"rebuilt buffers of {path or 'the model'}", ", ".join(empty), evidence)
        return out

    # -- the spec ---------------------------------------------------------------------------
    @staticmethod
    def restate(spec):
        """The spec with its probe evidence said as what it is here: a static build."""
        return _restate(spec)


def _restate(value, evidence: bool = False):
    if isinstance(value, str):
        if evidence and value.startswith("probe: "):
            return "static build: " + value[len("probe: ") :]
        return value
    if isinstance(value, tuple):
        return tuple(_restate(v, evidence) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _restate(getattr(value, f.name), evidence or f.name == "evidence")
            for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


def rendered_facts(spec) -> dict:
    """Every fact a descriptor is rendered from, without where the code came from, the evidence
    and the modules classes live in (an imported checkpoint's modules carry a hash): what a
    static build and an import of the same code must agree on."""

    def ref(r):
        return None if r is None else (r.module.rpartition(".")[2], r.name)

    def subblock(sb):
        if sb is None:
            return None
        plan = [(r.attr, r.replacement, r.tuple_size, r.residual_keyword) for r in sb.replacements]
        return plan, sb.weight_modules

    return dict(
        classes=[ref(c) for c in spec.decoder_layer_classes],
        stack=spec.layer_stack,
        embeddings=(spec.input_embedding, spec.output_embedding, spec.tied_embeddings),
        final_norm=spec.final_norm,
        kinds=[
            (ref(k.layer_class), k.children, k.layers, k.built_by, k.layout, k.shared_modules,
             subblock(k.attention), subblock(k.ffn),
             [(t.child, ref(t.cls), t.negate, t.value) for t in k.selector])
            for k in spec.kinds
        ],  # fmt: skip
        overrides=[(o.config_field, o.block_config_attr, o.with_flag) for o in spec.overrides],
        buffers=[(b.module, b.buffers, b.init_class) for b in spec.rebuilt_buffers],
        dummy=(
            spec.dummy_block.returns_tuple,
            spec.dummy_block.attributes,
            spec.dummy_block.tuple_size,
        ),
        predicates=spec.predicates,
        variants=[(v.module, v.group, v.flag, v.flag_value) for v in spec.config_variants],
    )


# -- helpers --------------------------------------------------------------------------------------
def _walk_cst(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


def _what_changes(changes: dict[str, Any], layer_path: str) -> str:
    fields = ", ".join(f"config.{k}={v!r}" for k, v in changes.items())
    return f"what setting {fields} changes in {layer_path}"


def _meta(info) -> torch.Tensor:
    return torch.empty(info.shape, dtype=_DTYPES.get(info.dtype, torch.float32), device="meta")


def _put(module: nn.Module, rel: str, info) -> None:
    """Register a checkpoint tensor below an unknown leaf, making plain modules on the way."""
    *parts, name = rel.split(".")
    for part in parts:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    module._parameters[name] = nn.Parameter(_meta(info), requires_grad=False)


def _unknown_attrs(root: nn.Module) -> list[str]:
    out = []
    for path, module in root.named_modules():
        for name, why in module.__dict__.get("_static_unknown", {}).items():
            if name:
                out.append(f"{path + '.' if path else ''}{name} ({why})")
    return out


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    owners: dict[str, nn.Module] = {}

    def visit(module, path, owner):
        if isinstance(module, StandIn) and is_pretrained(type(module)._static_mro):
            owner = module
        if owner is not None:
            owners[path] = owner
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, owner)

    visit(model, "", None)
    return owners
