"""Stage 3: build the model for real (on the meta device, or tiny on CPU) and read what it is.

The meta build of the default config gives the true module tree and state-dict names at full
size; a tiny CPU model gives a dynamic trace (which child modules a layer calls, what each
returns) and lets the inference check that a config override changes the shapes it should.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from puzzletron_runtime.puzzformer.patcher import set_config_field

from .analysis.layer_flow import ChildInfo, child_infos
from .errors import InferenceError, StaticGap
from .source import ModelSource
from .tiny import default_config, tiny_config, tiny_overrides


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logger (config warnings) and progress bars while probing."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_model(cls: type, config: Any, device: str = "meta") -> nn.Module:
    with quiet_transformers(), torch.device(device):
        model = cls(config)
    return model.eval()


def text_config_attr(config: Any) -> str | None:
    """The attribute holding the language-model config of a nested config, None when flat."""
    text = config.get_text_config()
    if text is config:
        return None
    for name, value in vars(config).items():
        if value is text:
            return name
    raise InferenceError("the text config", "get_text_config() is not an attribute of the config")


def layer_children(layer: nn.Module) -> dict[str, ChildInfo]:
    return child_infos(layer)


@dataclass(frozen=True)
class CallTrace:
    calls: int
    tuple_size: int | None  # None: returned a tensor
    returns_list: bool = False  # the sequence it returned was a list, not a tuple


class Probe:
    """The model of `source` built on the meta device: from the checkpoint's config when the
    source is a checkpoint directory, else from the model type's default config.
    (generator/static_probe.py's StaticProbe is the same interface for parsed code.)"""

    is_static = False  # StaticProbe: a static build of parsed code, nothing run
    trace_evidence = "probe: a traced forward of a tiny model agrees"

    @staticmethod
    def restate(spec):
        """The spec as inference built it (StaticProbe says its evidence is a static build)."""
        return spec

    def __init__(self, source: ModelSource):
        self.source = source
        if source.config is not None:
            self.config = source.config
        else:
            try:
                with quiet_transformers():
                    self.config = default_config(source.config_cls)
            except Exception as exc:
                raise InferenceError(
                    "the default config", f"{source.config_cls.__name__}() fails: {exc}"
                ) from None
        try:
            self.text_config = self.config.get_text_config()
        except ValueError as exc:
            raise InferenceError("the text config", str(exc)) from None
        self.text_config_attr = text_config_attr(self.config)
        try:
            self.model = build_model(source.causal_lm_cls, self.config)
        except StaticGap:
            raise  # a static build that cannot tell (generator/static_build.py)
        except Exception as exc:
            which = "the checkpoint's config" if source.config is not None else "its default config"
            raise InferenceError(
                "the probed module tree",
                f"{source.causal_lm_cls.__name__} does not build from {which} "
                f"on the meta device: {type(exc).__name__}: {exc}",
            ) from None
        self.paths = {id(mod): name for name, mod in self.model.named_modules()}
        self.tiny_extra: dict[str, Any] = {}  # changes every tiny config of this probe carries

    def variant(self, tiny_changes: dict[str, Any]) -> "Probe":
        """This probe, with tiny configs changed (to build a layer kind another config has)."""
        other = copy.copy(self)
        other.tiny_extra = {**self.tiny_extra, **tiny_changes}
        return other

    @property
    def num_layers(self) -> int:
        layers = getattr(self.text_config, "num_hidden_layers", None)
        if not isinstance(layers, int):
            raise InferenceError(
                "the layer count",
                f"{type(self.text_config).__name__} has no num_hidden_layers "
                f"(its sub-configs: {', '.join(sorted(self.text_config.sub_configs)) or 'none'})",
            )
        return layers

    @cached_property
    def state_keys(self) -> list[str]:
        return list(self.model.state_dict().keys())

    def path_of(self, module: nn.Module) -> str:
        return self.paths[id(module)]

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model

    def module_lists(self) -> list[tuple[str, nn.ModuleList]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList)]

    def input_embedding(self) -> str:
        return self.path_of(self.model.get_input_embeddings())

    def output_embedding(self) -> str:
        out = self.model.get_output_embeddings()
        if out is None:
            raise InferenceError("the output embedding", "get_output_embeddings() returns None")
        return self.path_of(out)

    def tied(self) -> bool:
        out = self.model.get_output_embeddings()
        return out is not None and out.weight is self.model.get_input_embeddings().weight

    # -- tiny model checks ------------------------------------------------------------------
    def tiny_config(self, **extra: Any) -> Any:
        extra = {**self.tiny_extra, **extra}
        try:
            with quiet_transformers():
                if self.source.config is not None:
                    return tiny_config_from(self.source.config, **extra)
                return tiny_config(self.source.config_cls, **extra)
        except Exception as exc:
            raise InferenceError(
                "a tiny config",
                f"{self.source.config_cls.__name__} rejects the small sizes: "
                f"{type(exc).__name__}: {exc}",
            ) from None

    def tiny_model(self, config: Any | None = None, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.source.causal_lm_cls, config or self.tiny_config(), "cpu")

    def trace_layer(self, layer_path: str, units=None) -> dict[str, CallTrace]:
        """Run a tiny model and record how often each child of `layer_path` (or each of the
        dotted `units` below it) is called and what it returns."""
        try:
            model = self.tiny_model()
        except Exception as exc:
            raise InferenceError(
                "a traced forward of a tiny model",
                f"the tiny config does not build: {type(exc).__name__}: {exc}",
            ) from None
        layer = model.get_submodule(layer_path)
        seen: dict[str, list[tuple[int | None, bool]]] = {}
        hooks = []
        named = (
            [(u, layer.get_submodule(u)) for u in units]
            if units is not None
            else list(layer.named_children())
        )
        for name, child in named:

            def hook(_mod, _args, output, name=name):
                size = len(output) if isinstance(output, (tuple, list)) else None
                seen.setdefault(name, []).append((size, isinstance(output, list)))

            hooks.append(child.register_forward_hook(hook))
        vocab = model.config.get_text_config().vocab_size
        try:
            with torch.no_grad(), quiet_transformers():
                model(input_ids=torch.arange(8).unsqueeze(0) % vocab)
        except Exception as exc:
            raise InferenceError(
                "a traced forward of a tiny model", f"it raises {type(exc).__name__}: {exc}"
            ) from None
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for name, sizes in seen.items():
            if len(set(sizes)) != 1:
                shown = [f"a list of {n}" if is_list else n for n, is_list in sizes]
                raise InferenceError(f"what {name} returns", f"varies between calls: {shown}")
            out[name] = CallTrace(len(sizes), *sizes[0])
        return out

    @cached_property
    def _called(self) -> frozenset[str]:
        model = self.tiny_model()
        seen: set[str] = set()
        hooks = [
            module.register_forward_pre_hook(lambda *_a, name=name: seen.add(name))
            for name, module in model.named_modules()
            if name
        ]
        vocab = model.config.get_text_config().vocab_size
        try:
            with torch.no_grad(), quiet_transformers():
                model(input_ids=torch.arange(8).unsqueeze(0) % vocab)
        except Exception as exc:
            raise InferenceError(
                "a traced forward of a tiny model", f"it raises {type(exc).__name__}: {exc}"
            ) from None
        finally:
            for h in hooks:
                h.remove()
        return frozenset(seen)

    def called_modules(self, asking: str = "") -> frozenset[str]:
        """Paths of the modules a text-only forward of the tiny model calls (`asking`: the module
        whose group depends on it, for StaticProbe's refusal)."""
        return self._called

    def checkpoint_names(self, model: nn.Module) -> dict[str, str]:
        """{name as save_pretrained writes it: the module name transformers loads it into}."""
        import tempfile
        from pathlib import Path

        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        # save a copy: save_pretrained writes into the model's config (dtype becomes a string),
        # which later builds from that config would inherit
        model = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            names = []
            for path in sorted(Path(tmp).glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    names.extend(f.keys())
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        out = {}
        for name in names:
            target, _ = rename_source_key(
                name, renamings, converters, model.base_model_prefix, meta
            )
            out[name] = target
        return out

    def shape_change(self, field: str, value: Any, layer_path: str) -> set[str]:
        """Children of the layer at `layer_path` whose parameter shapes change when the tiny
        config sets `field` to `value` (built on the meta device)."""
        return {k.split(".")[0] for k in self.shape_diff({field: value}, layer_path)}

    def shape_diff(self, changes: dict[str, Any], layer_path: str) -> dict[str, tuple]:
        """Parameters (below the layer at `layer_path`) whose shapes change when the tiny config
        sets `changes`, with their new shapes (() when the parameter disappears); {} when the
        changed config does not build."""
        return self.shape_diffs(changes, [layer_path])[layer_path]

    def shape_diffs(self, changes: dict[str, Any], layer_paths) -> dict[str, dict[str, tuple]]:
        """`shape_diff` for each of several layers, from one pair of builds."""
        base = build_model(self.source.causal_lm_cls, self.tiny_config())
        changed_config = self.tiny_config()
        target = changed_config.get_text_config()
        for field, value in changes.items():
            set_config_field(target, field, value)
        try:
            changed = build_model(self.source.causal_lm_cls, changed_config)
        except Exception:
            return {p: {} for p in layer_paths}
        out = {}
        for path in layer_paths:
            a = {k: tuple(v.shape) for k, v in base.get_submodule(path).named_parameters()}
            b = {k: tuple(v.shape) for k, v in changed.get_submodule(path).named_parameters()}
            out[path] = {k: b.get(k, ()) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        return out

    def layer_change_fails(self, changes: dict[str, Any], layer_path: str) -> str | None:
        """Build the tiny model on the CPU with `changes` to the config of the layer at
        `layer_path` alone, as Puzzletron's patcher builds a heterogeneous model: None when it
        builds, else why not (transformers' own weight init may read the whole model's config:
        Nemotron-H's Mamba init sizes A_log by the model's mamba_num_heads)."""
        from .verify.models import layer_change_fails

        stack_path, _, index = layer_path.rpartition(".")
        return layer_change_fails(
            self.source.causal_lm_cls, self.tiny_config(), stack_path, int(index), changes
        )

    def attribute_diff(self, changes: dict[str, Any], layer_path: str) -> dict[str, tuple]:
        """Plain number attributes of the modules below the layer at `layer_path` that differ
        when the tiny config sets `changes` (a router's `top_k`): "child.attr" -> (before,
        after); {} when the changed config does not build."""
        base = build_model(self.source.causal_lm_cls, self.tiny_config())
        changed_config = self.tiny_config()
        target = changed_config.get_text_config()
        for field, value in changes.items():
            set_config_field(target, field, value)
        try:
            changed = build_model(self.source.causal_lm_cls, changed_config)
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
        return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def tiny_config_from(config: Any, **extra: Any) -> Any:
    """A tiny config that keeps every structural choice of `config` (a checkpoint's), with the
    same sizes shrunk that tiny_config shrinks in a default config."""
    data = config.to_dict()
    data.update(tiny_overrides(config))
    data.update(extra)
    layers = data.get("num_hidden_layers")
    kinds = data.get("layer_types")
    if isinstance(layers, int) and isinstance(kinds, list) and len(kinds) != layers:
        data["layer_types"] = kinds[:layers]  # the checkpoint's first layers, in its order
    return type(config).from_dict(data)


# -- a checkpoint's headers, for code that is parsed but never run -------------------------------
_LAYER_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class HeaderProbe:
    """The module tree as a checkpoint's tensor names and shapes show it: nothing imported, no
    model built, no tensor data read (only the safetensors JSON headers)."""

    num_layers: int
    num_layers_field: str
    layer_stack: str
    layer_tensors: dict  # name relative to layer 0 -> shape
    outside: dict  # full name of every tensor outside the layer stack -> shape
    tensor_count: int

    def layer_children(self) -> list[str]:
        return list(dict.fromkeys(name.split(".")[0] for name in self.layer_tensors))

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_layers_field": self.num_layers_field,
            "layer_stack": self.layer_stack,
            "layer_children": self.layer_children(),
            "layer_tensors": {k: list(v) for k, v in self.layer_tensors.items()},
            "outside": {k: list(v) for k, v in self.outside.items()},
            "tensor_count": self.tensor_count,
        }


def probe_headers(checkpoint) -> HeaderProbe:
    """Find the layer stack in a checkpoint's tensor names: the prefix whose indices are exactly
    0..n-1 for the layer count config.json states."""
    config = checkpoint.config_dict
    found = [(f, config.get(f)) for f in LAYER_COUNT_FIELDS if isinstance(config.get(f), int)]
    if not found:
        raise InferenceError(
            "the layer count", f"config.json has none of {', '.join(LAYER_COUNT_FIELDS)}"
        )
    field, n = found[0]
    tensors = checkpoint.tensors
    indices: dict[str, set[int]] = {}
    for name in tensors:
        m = _LAYER_NAME.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(int(m["index"]))
    stacks = [p for p, idx in indices.items() if idx == set(range(n))]
    if len(stacks) != 1:
        seen = ", ".join(f"{p} ({len(i)})" for p, i in sorted(indices.items())) or "none"
        raise InferenceError(
            "the layer stack",
            f"config.json says {field}={n}, but the tensor names hold "
            f"{'several' if stacks else 'no'} indexed stacks of exactly that many layers",
            [f"indexed prefixes: {seen}"],
        )
    stack = stacks[0]
    first = f"{stack}.0."
    layer = {k[len(first) :]: v.shape for k, v in tensors.items() if k.startswith(first)}
    outside = {k: v.shape for k, v in tensors.items() if not k.startswith(f"{stack}.")}
    return HeaderProbe(n, field, stack, layer, outside, len(tensors))
