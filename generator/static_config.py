"""The config of a checkpoint whose code is parsed, not imported: config.json's values and the
defaults its parsed config class declares, given to the transformers config class it derives from
(its parsed `__init__` / `__post_init__` interpreted, never run)."""

from __future__ import annotations

from typing import Any

import libcst as cst

from .analysis.source_index import dotted
from .checkpoint import CONFIG, Checkpoint, CheckpointInputError
from .errors import InferenceError
from .parsed_source import ParsedClass, ParsedCode, gap
from .probe import quiet_transformers
from .static_build import StaticBuilder


def config_class(code: ParsedCode, builder: StaticBuilder, node: ParsedClass) -> type:
    """A subclass of the nearest transformers config class the parsed config class derives from,
    named like it, carrying its literal class attributes (model_type, attribute_map): never the
    parsed class itself."""
    from transformers import PretrainedConfig

    mro = code.mro(node)
    base = next((k for k in mro if isinstance(k, type) and issubclass(k, PretrainedConfig)), None)
    if base is None:
        raise gap(
            f"the config class {node.name}",
            "it does not derive from a transformers config class",
            node.where(),
        )
    ns: dict[str, Any] = {"__module__": node.module.remote_name, "__qualname__": node.name}
    for klass in reversed(mro):
        if not isinstance(klass, ParsedClass):
            continue
        fields = klass.field_defaults()
        for attr, expr in klass.class_attrs().items():
            # plain class attributes (model_type, attribute_map, LFM3's _rope_type_labels), not
            # dataclass-style fields (those are config values: see checkpoint_config)
            if attr in fields or attr.startswith("__"):
                continue
            value = builder.module_value(expr, klass.module)
            if isinstance(value, (str, int, float, bool, dict, list, tuple, type(None))):
                ns[attr] = value
        # properties the model reads (Jamba's layers_block_type, Nemotron-H's
        # num_hidden_layers): their parsed bodies are interpreted on the config when used
        getters, setters = {}, {}
        for func in klass.node.body.body:
            if not isinstance(func, cst.FunctionDef):
                continue
            decorators = [dotted(d.decorator) for d in func.decorators]
            if "property" in decorators:
                getters[func.name.value] = func
            elif f"{func.name.value}.setter" in decorators:
                setters[func.name.value] = func
        for name, func in getters.items():
            setter = setters.get(name)
            ns[name] = property(
                _interpreted(builder, klass, func, getter=True),
                _interpreted(builder, klass, setter, getter=False) if setter else None,
            )
    return type(node.name, (base,), ns)


def _interpreted(builder: StaticBuilder, klass: ParsedClass, func, getter: bool):
    """A property getter or setter of a parsed config class, interpreted (never run)."""
    from .analysis.evaluate import UNKNOWN
    from .static_standins import parsed_scope

    def call(config, *value):
        try:
            result = builder.run_function(
                func, parsed_scope(builder, klass.module), klass.module.parsed, klass, config,
                list(value), {},
            )  # fmt: skip
        except Exception:
            result = UNKNOWN
        if getter and result is UNKNOWN:
            raise AttributeError(func.name.value)
        return result

    return call


def checkpoint_config(ckpt: Checkpoint, code, builder, node: ParsedClass, config_cls: type):
    """The config, as loading config.json through the parsed class would make it, without running
    that class: config.json's values and the defaults the parsed class declares (dataclass-style
    fields, `__init__` parameters) are given to the transformers class it derives from; then the
    parsed `__init__` and `__post_init__` are interpreted on the result, so that what they derive
    (`self.head_dim = hidden_size // num_attention_heads`) is set too. Values the interpretation
    cannot compute are left as config.json has them."""
    from .static_standins import InterpretedRaise, parsed_scope

    data = {k: v for k, v in ckpt.config_dict.items() if k != "auto_map"}
    mro = [k for k in code.mro(node) if isinstance(k, ParsedClass)]
    aliases = getattr(config_cls, "attribute_map", {}) or {}

    def given(name: str) -> bool:  # in config.json, under its name or its attribute_map alias
        return (
            name in data
            or aliases.get(name) in data
            or any(target == name and alias in data for alias, target in aliases.items())
        )

    for klass in mro:  # most derived first: its defaults win
        for name, expr in klass.field_defaults().items():
            if not given(name):
                value = builder.module_value(expr, klass.module)
                if isinstance(value, (int, float, str, bool, list, dict, type(None))):
                    data[name] = value
        init = klass.methods.get("__init__")
        if init is None:
            continue
        for param in (*init.params.params, *init.params.kwonly_params):
            name = param.name.value
            if given(name) or name == "self" or param.default is None:
                continue
            value = builder.module_value(param.default, klass.module)
            if isinstance(value, (int, float, str, bool, list, dict, type(None))):
                data[name] = value
    where = ckpt.directory / CONFIG
    try:
        with quiet_transformers():
            config = config_cls.from_dict(data)
    except Exception as exc:
        raise CheckpointInputError(
            f"{where}: does not make a {config_cls.__name__} (built by "
            f"{config_cls.__mro__[1].__name__}, the transformers class it derives from): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None
    for method in ("__init__", "__post_init__"):
        owner = next((k for k in mro if method in k.methods), None)
        if owner is None:
            continue
        kwargs = dict(data) if method == "__init__" else {}
        try:
            builder.run_function(owner.methods[method], parsed_scope(builder, owner.module),
                                 owner.module.parsed, owner, config, [], kwargs)  # fmt: skip
        except InterpretedRaise as exc:
            raise CheckpointInputError(
                f"{where}: does not make a {config_cls.__name__}: its {method} rejects it ({exc})"
            ) from None
        except InferenceError:
            pass  # what it derives past a statement the parse cannot decide stays unset
    return config
