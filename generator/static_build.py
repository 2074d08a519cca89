"""A static build: the module tree a checkpoint's own code would build, read from its parsed
source without importing or executing it.

Each class of the checkpoint's files becomes a *stand-in*: an `nn.Module` subclass named after
the parsed class (never the class itself), whose `__init__` interprets the parsed `__init__`
statement by statement. Values come from the config (built from config.json data by
transformers' own config classes), literals and arithmetic; `self.x = ...` assignments that the
interpretation can evaluate become plain attributes (so that `if self.block_type == ...` in a
forward can be decided); constructions become children:

- torch.nn classes (`nn.Linear`, `nn.Embedding`, `nn.ModuleList`, `nn.Parameter(torch.ones(n))`)
  are built for real on the meta device: library code, no data;
- transformers classes that are not pretrained models (`LlamaRMSNorm(...)`, `ACT2FN[...]`) are
  built for real too (library code the user already runs); when that fails, and for pretrained
  models, their source is interpreted like the checkpoint's;
- classes of the checkpoint's files are stand-ins again, interpreted recursively;
- module-level functions and methods of those files are interpreted, never called.

What the interpretation cannot evaluate stays unknown, and is never guessed: a torch module whose
arguments are unknown is an *unknown leaf* (its tensors can only come from a checkpoint's
headers), a condition that decides which modules exist and cannot be evaluated stops the build
(StaticGap), a `raise` the interpretation reaches is the model rejecting its config
(InterpretedRaise, as a real build would raise).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

import libcst as cst
from torch import nn

from .analysis.evaluate import UNKNOWN
from .analysis.source_index import ParsedFile
from .parsed_source import (
    ParsedClass,
    ParsedCode,
    ParsedModule,
    StaticSourceIndex,
    defines,
    gap,
)
from .static_interpret import Frame
from .static_standins import (
    MAX_DEPTH,
    InterpretedRaise,
    ReturnSignal,
    StandIn,
    UnknownTensor,
    get_path,
    has_unknown,
    is_buffer_class,
    is_config,
    is_pretrained,
    is_static_method,
    is_torch_leaf,
    parsed_scope,
    real_scope,
    stub_method,
)

# transformers modules (besides transformers.models.*) whose nn.Module classes are built for real
_RUNNABLE_MODULES = {
    "transformers.activations",
    "transformers.pytorch_utils",
    "transformers.modeling_layers",
}


# -- the builder --------------------------------------------------------------------------------
class StaticBuilder:
    """Stand-in classes for one checkpoint's code, and the interpretation of their `__init__`."""

    def __init__(self, code: ParsedCode, index: StaticSourceIndex):
        self.code = code
        self.index = index
        self._types: dict[int, type] = {}
        self.depth = 0
        self.strict = True

    @contextlib.contextmanager
    def lenient(self):
        """Builds in which modules the parse cannot compute may stay unknown (the checkpoint's
        headers fill them in, or only some layer's shapes are compared)."""
        saved, self.strict = self.strict, False
        try:
            yield
        finally:
            self.strict = saved

    # -- classes ------------------------------------------------------------------------------
    def type_for(self, node) -> type:
        """The stand-in class of a parsed class, or the look-alike of a library class whose
        constructor is interpreted rather than run."""
        key = id(node)
        if key in self._types:
            return self._types[key]
        if isinstance(node, ParsedClass):
            mro = self.code.mro(node)
            module_name, name = node.module.remote_name, node.name
        else:
            mro = list(node.__mro__)
            module_name, name = node.__module__, node.__name__
        ns: dict[str, Any] = {
            "__module__": module_name,
            "__qualname__": name,
            "_static_node": node,
            "_static_mro": tuple(mro),
            "_static_builder": self,
        }
        for klass in reversed(mro):
            if isinstance(klass, ParsedClass):
                for attr, expr in klass.class_attrs().items():
                    if attr.startswith("__") or hasattr(nn.Module, attr) or attr in vars(StandIn):
                        continue
                    try:
                        value = self.module_value(expr, klass.module)
                    except Exception:
                        continue
                    if value is not UNKNOWN:
                        ns[attr] = value
            elif klass.__module__.startswith("transformers."):
                for attr in (
                    "base_model_prefix",
                    "_input_embed_layer",
                    "_tied_weights_keys",
                    "_supports_sdpa",
                ):
                    if attr in vars(klass):
                        ns[attr] = vars(klass)[attr]
        for klass in mro:
            if isinstance(klass, ParsedClass):
                names = list(klass.methods)
            elif klass.__module__.startswith("transformers.models."):
                names = [n for n, v in vars(klass).items() if inspect.isfunction(v)]
            else:
                continue
            for attr in names:
                if attr in ns or attr == "__init__":
                    continue
                if attr == "forward" or not (hasattr(StandIn, attr) or attr.startswith("__")):
                    ns[attr] = stub_method(attr)
        # a class deriving from a torch module (nn.Embedding, nn.Linear) is one: torch's own
        # __init__ builds its tensors when the interpretation reaches it
        leaf = next((k for k in mro if is_torch_leaf(k)), None)
        cls = type(name, (StandIn,) if leaf is None else (StandIn, leaf), ns)
        self._types[key] = cls
        return cls

    def module_value(self, expr: cst.BaseExpression, module: ParsedModule):
        """A module-level or class-level expression of a parsed file (a literal, a dispatch table
        of classes), evaluated without a `self`."""
        frame = Frame(self, parsed_scope(self, module), module.parsed, None, None)
        return frame.ev(expr)

    # -- construction -------------------------------------------------------------------------
    def construct(self, cls, args, kwargs, site: str):
        """`cls(*args, **kwargs)` as the model's own code would build it (see the module doc)."""
        if isinstance(cls, ParsedClass):
            return self.instantiate(self.type_for(cls), args, kwargs)
        unknown = has_unknown(args) or has_unknown(kwargs)
        if cls is nn.Parameter or is_buffer_class(cls):
            if unknown:
                kind = "parameter" if cls is nn.Parameter else "buffer"
                persistent = kwargs.get("persistent", True)
                return UnknownTensor(kind, site, persistent is not False)
            return cls(*args, **kwargs)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            return UNKNOWN
        module = cls.__module__
        if module.startswith("torch."):
            if unknown:
                return self.unknown_leaf(cls, site, "its arguments are not all known")
            try:
                return cls(*args, **kwargs)
            except Exception as exc:
                raise InterpretedRaise(f"{site}: {type(exc).__name__}: {exc}") from None
        if module.startswith("transformers."):
            # model building blocks are built for real (library code); anything else of the
            # library (integrations that fetch kernels or weights) only has its source read
            runnable = module.startswith("transformers.models.") or module in _RUNNABLE_MODULES
            if runnable and not unknown and not is_pretrained(cls.__mro__):
                try:
                    return cls(*args, **kwargs)
                except Exception:
                    pass  # a config this class does not take as it is: read its source instead
            return self.instantiate(self.type_for(cls), args, kwargs)
        return self.unknown_leaf(cls, site, f"{module} is neither torch nor transformers")

    def unknown_leaf(self, cls: type, site: str, why: str) -> nn.Module:
        leaf = StandIn.__new__(self.type_for(cls))
        nn.Module.__init__(leaf)
        leaf.static_unknowns()[""] = f"{site}: {why}"
        return leaf

    def instantiate(self, stand_in_type: type, args, kwargs) -> nn.Module:
        obj = StandIn.__new__(stand_in_type)
        nn.Module.__init__(obj)
        self.initialise(obj, stand_in_type._static_mro, args, kwargs)
        self.finish(obj)
        return obj

    def initialise(self, obj, mro, args, kwargs) -> None:
        """Run the first `__init__` along `mro` on `obj`."""
        owner = next((k for k in mro if defines(k, "__init__")), None)
        if owner is not None:
            self.run_init(owner, obj, list(args), dict(kwargs))

    def init_after(self, obj, owner, args, kwargs) -> None:
        """`super().__init__(...)` in a method of `owner`: the next `__init__` along obj's MRO."""
        mro = list(type(obj)._static_mro)
        start = mro.index(owner) + 1 if owner in mro else len(mro)
        self.initialise(obj, mro[start:], args, kwargs)

    def run_init(self, owner, obj, args, kwargs) -> None:
        from transformers import PreTrainedModel

        if isinstance(owner, ParsedClass):
            func = owner.methods["__init__"]
            self.run_function(func, parsed_scope(self, owner.module), owner.module.parsed,
                              owner, obj, args, kwargs)  # fmt: skip
            return
        if owner is PreTrainedModel:
            config = args[0] if args else kwargs.get("config", UNKNOWN)
            obj.config = config
            if is_config(config) and config._attn_implementation is None:
                # what PreTrainedModel.__init__ settles when no implementation is asked for
                sdpa = getattr(type(obj), "_supports_sdpa", False) is True
                config._attn_implementation = "sdpa" if sdpa else "eager"
            return
        if is_torch_leaf(owner):  # library code: builds the tensors of a torch module subclass
            if has_unknown(args) or has_unknown(kwargs):
                obj.static_unknowns()[""] = (
                    f"{owner.__name__}.__init__ of {type(obj).__name__}: its arguments are not "
                    "all known"
                )
                return
            unknowns = obj.static_unknowns()
            try:
                owner.__init__(obj, *args, **kwargs)
            except Exception as exc:
                raise InterpretedRaise(f"{owner.__name__}.__init__: {exc}") from None
            obj.__dict__["_static_unknown"] = unknowns
            return
        if owner.__module__.startswith("transformers.") and owner.__module__ not in (
            "transformers.modeling_utils",
            "transformers.configuration_utils",
        ):
            parsed, _, func = self.index.find_method(owner, "__init__")
            scope = real_scope(sys.modules[owner.__module__])
            self.run_function(func, scope, parsed, owner, obj, args, kwargs)
        # nn.Module, object and library mixins: nothing the stand-in needs

    def finish(self, obj) -> None:
        """What a pretrained model's post_init does to the structure: tie the embeddings."""
        if not is_pretrained(type(obj)._static_mro):
            return
        keys = getattr(type(obj), "_tied_weights_keys", None)
        # as transformers' get_expanded_tied_weights_keys reads it
        if not keys or not getattr(getattr(obj, "config", None), "tie_word_embeddings", False):
            return
        if not isinstance(keys, dict):
            raise gap(
                "the tied embeddings",
                f"{type(obj).__name__}._tied_weights_keys is {keys!r}, not the mapping "
                "{target: source} transformers 5 ties",
            )
        tied = obj.__dict__.setdefault("_static_tied", {})
        for target, source in keys.items():
            src = get_path(obj, source)
            parent, _, name = target.rpartition(".")
            module = get_path(obj, parent) if parent else obj
            if not isinstance(src, nn.Parameter) or not isinstance(module, nn.Module):
                raise gap(
                    "the tied embeddings",
                    f"_tied_weights_keys maps {target!r} to {source!r}, which the static build "
                    "does not hold as parameters",
                )
            module._parameters[name] = src
            tied[target] = source

    # -- functions ------------------------------------------------------------------------------
    def run_function(self, func: cst.FunctionDef, scope, parsed: ParsedFile, owner, self_obj,
                     args, kwargs):  # fmt: skip
        """Interpret `func` (a method when `self_obj` is given); its return value."""
        if self.depth >= MAX_DEPTH:
            raise gap(f"{func.name.value}", "calls nest too deep to read", parsed.where(func))
        self.depth += 1
        try:
            frame = Frame(self, scope, parsed, owner, self_obj)
            frame.bind(
                func, args, kwargs, method=self_obj is not None and not is_static_method(func)
            )
            try:
                frame.block(func.body.body)
            except ReturnSignal as ret:
                return ret.value
            return None
        finally:
            self.depth -= 1
