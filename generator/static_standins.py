"""Values of a static build: stand-in modules for parsed classes, tensors and values the
interpretation cannot compute, the scopes names resolve in, and the small predicates the builder
and the interpreter share (see static_build for the whole picture)."""

from __future__ import annotations

import builtins
import inspect
from typing import TYPE_CHECKING, Any

import libcst as cst
import torch
from torch import nn

from .analysis.evaluate import UNKNOWN
from .analysis.source_index import dotted
from .errors import InferenceError
from .parsed_source import (
    ParsedClass,
    ParsedModule,
    defines,
    gap,
)

if TYPE_CHECKING:
    from .static_build import StaticBuilder

MAX_DEPTH = 40  # nested constructions and interpreted calls
MAX_LOOP = 100_000


class InterpretedRaise(Exception):
    """The interpreted code reached a `raise` (or a failing assert): the model rejects the config,
    as its real constructor would."""


class ReturnSignal(Exception):
    def __init__(self, value):
        self.value = value


class BreakSignal(Exception):
    pass


class ContinueSignal(Exception):
    pass


class UnknownTensor:
    """A parameter or buffer whose value the interpretation cannot compute."""

    def __init__(self, kind: str, site: str, persistent: bool = True):
        self.kind, self.site, self.persistent = kind, site, persistent


# -- stand-in classes ------------------------------------------------------------------------------
class StandIn(nn.Module):
    """Base of every stand-in class. Class attributes set per class: `_static_node` (the parsed
    or library class it stands for), `_static_mro` (that class's method resolution order, for the
    analysis), `_static_builder`."""

    _static_node: Any = None
    _static_mro: tuple = ()
    _static_builder: "StaticBuilder | None" = None

    def __init__(self, *args, **kwargs):
        nn.Module.__init__(self)
        builder = type(self)._static_builder
        with torch.device("meta"):
            builder.initialise(self, type(self)._static_mro, args, kwargs)
            builder.finish(self)
        if builder.strict:  # a build of a config no checkpoint header describes
            require_known(self, "", "a build of another config of this model type")

    def forward(self, *args, **kwargs):  # pragma: no cover - never run
        raise RuntimeError(f"{type(self).__name__} is a stand-in of parsed code: it never runs")

    @property
    def base_model(self):
        prefix = getattr(type(self), "base_model_prefix", None)
        return getattr(self, prefix, self) if isinstance(prefix, str) and prefix else self

    def get_input_embeddings(self):
        return _embedding(self, "get_input_embeddings")

    def get_output_embeddings(self):
        return _embedding(self, "get_output_embeddings")

    def static_unknowns(self) -> dict:
        return self.__dict__.setdefault("_static_unknown", {})


def is_pretrained(node) -> bool:
    """Whether a parsed or library class derives from transformers' PreTrainedModel."""
    from transformers import PreTrainedModel

    mro = node if isinstance(node, (list, tuple)) else getattr(node, "_static_mro", ())
    return any(k is PreTrainedModel for k in mro)


def _embedding(obj: StandIn, method: str):
    """get_input_embeddings / get_output_embeddings of a stand-in, without running its code: the
    method of the class that defines it, when it is `return self.<path>`; transformers' own
    default (which reads attributes only) when no model class overrides it."""
    from transformers.modeling_utils import EmbeddingAccessMixin

    cls = type(obj)
    owner = next((k for k in cls._static_mro if defines(k, method)), None)
    fact = f"{cls.__name__}.{method}()"
    if owner is None:
        raise InferenceError(fact, "no class of the model defines it")
    if isinstance(owner, type) and vars(owner)[method] is vars(EmbeddingAccessMixin).get(method):
        return getattr(EmbeddingAccessMixin, method)(obj)
    parsed, _, func = cls._static_builder.index.find_method(cls, method)
    body = [
        s
        for s in func.body.body
        if not (
            isinstance(s, cst.SimpleStatementLine)
            and isinstance(s.body[0], cst.Expr)
            and isinstance(s.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
        )
    ]
    if (
        len(body) == 1
        and isinstance(body[0], cst.SimpleStatementLine)
        and isinstance(body[0].body[0], cst.Return)
        and body[0].body[0].value is not None
    ):
        returned = body[0].body[0].value
        delegated = (  # `return self.backbone.get_input_embeddings()`
            isinstance(returned, cst.Call)
            and not returned.args
            and isinstance(returned.func, cst.Attribute)
            and returned.func.attr.value == method
        )
        path = dotted(returned.func.value if delegated else returned)
        if path and path.startswith("self."):
            value = obj
            for part in path.split(".")[1:]:
                value = getattr(value, part, None)
            if delegated and isinstance(value, nn.Module) and hasattr(value, method):
                return getattr(value, method)()
            if not delegated and (isinstance(value, nn.Module) or value is None):
                return value
    raise gap(
        fact,
        f"its body is not `return self.<module path>` (nor `return self.<path>.{method}()`)",
        parsed.where(func),
    )


def stub_method(name: str):
    def stub(self, *args, **kwargs):  # pragma: no cover - never run
        raise RuntimeError(f"{type(self).__name__}.{name} is parsed code: it never runs")

    stub.__name__ = name
    return stub


def is_torch_leaf(klass) -> bool:
    """A torch module class other than nn.Module itself (nn.Linear, nn.Embedding, ...)."""
    return (
        isinstance(klass, type)
        and issubclass(klass, nn.Module)
        and klass is not nn.Module
        and klass.__module__.startswith("torch.")
    )


def is_buffer_class(cls) -> bool:
    return getattr(nn, "Buffer", None) is cls


def is_static_method(func: cst.FunctionDef) -> bool:
    return any(dotted(d.decorator) == "staticmethod" for d in func.decorators)


def get_path(root, path: str):
    value = root
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def has_unknown(value) -> bool:
    if value is UNKNOWN or isinstance(value, UnknownTensor):
        return True
    if isinstance(value, (list, tuple, set)):
        return any(has_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(has_unknown(v) for v in value.values())
    return False


def parsed_scope(builder: StaticBuilder, module: ParsedModule):
    """Names of a parsed file: its classes, functions and imports, and module-level tables."""

    def lookup(name: str):
        return builder.code.resolve(module, name, builder.module_value)

    return lookup


def real_scope(module):
    names = vars(module)

    def lookup(name: str):
        if name in names:
            return names[name]
        return getattr(builtins, name, UNKNOWN)

    return lookup


def stand_in_method(obj: StandIn, name: str) -> bool:
    """Whether `obj.<name>` is a method the interpretation reads (the model's own, or nn.Module's
    registration methods), not an attribute."""
    if name in ("register_buffer", "register_parameter", "add_module", "register_module"):
        return True
    if (
        name in obj.__dict__
        or name in obj._modules
        or name in obj._parameters
        or name in obj._buffers
    ):
        return False
    return method_owner(type(obj)._static_mro, name) is not None


def method_owner(mro, name: str):
    """The first class along `mro` whose body defines method `name` (nn.Module and object
    excluded: their methods are the stand-in's own)."""
    for k in mro:
        if isinstance(k, ParsedClass):
            if name in k.methods:
                return k
        elif k not in (nn.Module, object):
            value = vars(k).get(name)
            if isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
                return k
    return None


def is_unknown(v) -> bool:
    return v is UNKNOWN or isinstance(v, UnknownTensor)


def is_config(obj) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def walk_nodes(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, (cst.FunctionDef, cst.ClassDef, cst.Lambda)) and n is not node:
            continue
        stack.extend(reversed(list(n.children)))


def touches_self(n) -> bool:
    if isinstance(n, (cst.Assign, cst.AugAssign, cst.AnnAssign)):
        targets = [t.target for t in n.targets] if isinstance(n, cst.Assign) else [n.target]
        return any(
            (dotted(t) or "").startswith("self.")
            for t in targets
            if not isinstance(t, (cst.Tuple, cst.List))
        ) or any(
            (dotted(e.value) or "").startswith("self.")
            for t in targets
            if isinstance(t, (cst.Tuple, cst.List))
            for e in t.elements
        )
    if isinstance(n, cst.Call):
        name = dotted(n.func) or ""
        if name.startswith("self.") or name.endswith("__init__"):
            return True
        if isinstance(n.func, cst.Attribute) and isinstance(n.func.value, cst.Call):
            inner = dotted(n.func.value.func)
            return inner == "super"
    return False


def target_names(target) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in target_names(e.value)]
    return []


def require_known(model: nn.Module, prefix: str, fact: str) -> None:
    """Stop, naming `fact`, when the parse could not compute a module of `model` below `prefix`
    (the checkpoint's headers give its shapes only at the checkpoint's own config)."""
    root = model.get_submodule(prefix) if prefix else model
    for path, module in root.named_modules():
        unknown = module.__dict__.get("_static_unknown", {})
        tensors = [  # a buffer outside the state dict has no shape a checkpoint could need
            n
            for n in module.__dict__.get("_static_unknown_tensors", {})
            if n in unknown and n not in module._non_persistent_buffers_set
        ]
        reason = unknown.get("") or (unknown[tensors[0]] if tensors else None)
        if reason:
            full = ".".join(p for p in (prefix, path) if p)
            raise gap(
                fact,
                f"the parse does not compute the shapes of {full} ({reason}); the checkpoint's "
                "headers give them only at its own config",
            )
