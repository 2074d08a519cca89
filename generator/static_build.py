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

import ast
import builtins
import contextlib
import inspect
import math
import operator
import sys
from typing import Any

import libcst as cst
import torch
from torch import nn

from .analysis.evaluate import UNKNOWN, Evaluator
from .analysis.source_index import ParsedFile, dotted
from .errors import InferenceError
from .parsed_source import (
    ParsedClass,
    ParsedCode,
    ParsedFunction,
    ParsedModule,
    StaticSourceIndex,
    defines,
    gap,
)

MAX_DEPTH = 40  # nested constructions and interpreted calls
MAX_LOOP = 100_000


class InterpretedRaise(Exception):
    """The interpreted code reached a `raise` (or a failing assert): the model rejects the config,
    as its real constructor would."""


class _Return(Exception):
    def __init__(self, value):
        self.value = value


class _Break(Exception):
    pass


class _Continue(Exception):
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


def _stub(name: str):
    def stub(self, *args, **kwargs):  # pragma: no cover - never run
        raise RuntimeError(f"{type(self).__name__}.{name} is parsed code: it never runs")

    stub.__name__ = name
    return stub


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
                    ns[attr] = _stub(attr)
        # a class deriving from a torch module (nn.Embedding, nn.Linear) is one: torch's own
        # __init__ builds its tensors when the interpretation reaches it
        leaf = next((k for k in mro if _torch_leaf(k)), None)
        cls = type(name, (StandIn,) if leaf is None else (StandIn, leaf), ns)
        self._types[key] = cls
        return cls

    def module_value(self, expr: cst.BaseExpression, module: ParsedModule):
        """A module-level or class-level expression of a parsed file (a literal, a dispatch table
        of classes), evaluated without a `self`."""
        frame = _Frame(self, _parsed_scope(self, module), module.parsed, None, None)
        return frame.ev(expr)

    # -- construction -------------------------------------------------------------------------
    def construct(self, cls, args, kwargs, site: str):
        """`cls(*args, **kwargs)` as the model's own code would build it (see the module doc)."""
        if isinstance(cls, ParsedClass):
            return self.instantiate(self.type_for(cls), args, kwargs)
        unknown = _has_unknown(args) or _has_unknown(kwargs)
        if cls is nn.Parameter or _is_buffer_class(cls):
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
            self.run_function(func, _parsed_scope(self, owner.module), owner.module.parsed,
                              owner, obj, args, kwargs)  # fmt: skip
            return
        if owner is PreTrainedModel:
            config = args[0] if args else kwargs.get("config", UNKNOWN)
            obj.config = config
            if _is_config(config) and config._attn_implementation is None:
                # what PreTrainedModel.__init__ settles when no implementation is asked for
                sdpa = getattr(type(obj), "_supports_sdpa", False) is True
                config._attn_implementation = "sdpa" if sdpa else "eager"
            return
        if _torch_leaf(owner):  # library code: builds the tensors of a torch module subclass
            if _has_unknown(args) or _has_unknown(kwargs):
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
            scope = _real_scope(sys.modules[owner.__module__])
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
            src = _get(obj, source)
            parent, _, name = target.rpartition(".")
            module = _get(obj, parent) if parent else obj
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
            frame = _Frame(self, scope, parsed, owner, self_obj)
            frame.bind(func, args, kwargs, method=self_obj is not None and not _static(func))
            try:
                frame.block(func.body.body)
            except _Return as ret:
                return ret.value
            return None
        finally:
            self.depth -= 1


def _torch_leaf(klass) -> bool:
    """A torch module class other than nn.Module itself (nn.Linear, nn.Embedding, ...)."""
    return (
        isinstance(klass, type)
        and issubclass(klass, nn.Module)
        and klass is not nn.Module
        and klass.__module__.startswith("torch.")
    )


def _is_buffer_class(cls) -> bool:
    return getattr(nn, "Buffer", None) is cls


def _static(func: cst.FunctionDef) -> bool:
    return any(dotted(d.decorator) == "staticmethod" for d in func.decorators)


def _get(root, path: str):
    value = root
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _has_unknown(value) -> bool:
    if value is UNKNOWN or isinstance(value, UnknownTensor):
        return True
    if isinstance(value, (list, tuple, set)):
        return any(_has_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    return False


def _parsed_scope(builder: StaticBuilder, module: ParsedModule):
    """Names of a parsed file: its classes, functions and imports, and module-level tables."""

    def lookup(name: str):
        return builder.code.resolve(module, name, builder.module_value)

    return lookup


def _real_scope(module):
    names = vars(module)

    def lookup(name: str):
        if name in names:
            return names[name]
        return getattr(builtins, name, UNKNOWN)

    return lookup


# -- the interpreter ------------------------------------------------------------------------------
_BINOPS = {
    cst.Add: operator.add, cst.Subtract: operator.sub, cst.Multiply: operator.mul,
    cst.Divide: operator.truediv, cst.FloorDivide: operator.floordiv, cst.Modulo: operator.mod,
    cst.Power: operator.pow, cst.LeftShift: operator.lshift, cst.RightShift: operator.rshift,
    cst.BitOr: operator.or_, cst.BitAnd: operator.and_, cst.BitXor: operator.xor,
    cst.MatrixMultiply: operator.matmul,
}  # fmt: skip
_AUGOPS = {
    cst.AddAssign: operator.add, cst.SubtractAssign: operator.sub,
    cst.MultiplyAssign: operator.mul, cst.DivideAssign: operator.truediv,
    cst.FloorDivideAssign: operator.floordiv, cst.ModuloAssign: operator.mod,
    cst.PowerAssign: operator.pow,
}  # fmt: skip
_SAFE_BUILTINS = {
    int, float, bool, str, min, max, abs, round, len, range, list, tuple, dict, set, sum,
    isinstance, divmod, pow, sorted, enumerate, zip, any, all, reversed, hasattr, getattr,
}  # fmt: skip
# torch functions that only make tensors (on the meta device here: no data, no files)
_TORCH_FACTORIES = {
    "ones", "zeros", "empty", "full", "randn", "rand", "arange", "tensor", "ones_like",
    "zeros_like", "empty_like", "full_like", "eye", "linspace", "tril", "triu", "cat", "stack",
    "outer", "exp", "log", "sqrt", "pow", "randint", "normal",
}  # fmt: skip
# transformers modules (besides transformers.models.*) whose nn.Module classes are built for real
_RUNNABLE_MODULES = {
    "transformers.activations",
    "transformers.pytorch_utils",
    "transformers.modeling_layers",
}
# the transformers modules whose functions the interpretation may call
_TRANSFORMERS_FUNCTIONS = {
    "transformers.modeling_rope_utils",
    "transformers.activations",
    "transformers.utils.generic",
    "transformers.pytorch_utils",
}
_PLAIN = (int, float, bool, str, bytes, list, tuple, dict, set, frozenset, range, type(None))
_CONTAINER_METHODS = {"append", "extend", "insert", "add_module"}


class _CompUnknown(Exception):
    """A comprehension over something the interpretation does not know."""


class _SuperProxy:
    def __init__(self, owner, obj):
        self.owner, self.obj = owner, obj


class _Method:
    """A method of a stand-in or of a parsed class, bound for interpretation."""

    def __init__(self, kind, obj, name, owner=None):
        self.kind, self.obj, self.name, self.owner = kind, obj, name, owner


class _Frame(Evaluator):
    """One interpreted function body: its locals, `self`, and the scope its names resolve in."""

    def __init__(self, builder: StaticBuilder, scope, parsed: ParsedFile, owner, self_obj):
        super().__init__(self_obj, {})
        self.builder = builder
        self.scope = scope
        self.parsed = parsed
        self.owner = owner
        self.self_obj = self_obj
        self.known = {} if self_obj is None else {"self": self_obj}

    # -- evidence ------------------------------------------------------------------------------
    def site(self, node: cst.CSTNode | None) -> str:
        if node is None:
            return self.parsed.display
        return f"{self.parsed.where(node)} `{self.parsed.code(node, 70)}`"

    # -- parameters ----------------------------------------------------------------------------
    def bind(self, func: cst.FunctionDef, args, kwargs, method: bool) -> None:
        p = func.params
        positional = [*p.posonly_params, *p.params]
        if method and positional:
            self.known[positional[0].name.value] = self.self_obj
            positional = positional[1:]
        args = list(args)
        kwargs = dict(kwargs)
        for param in positional:
            name = param.name.value
            if args:
                self.known[name] = args.pop(0)
            elif name in kwargs:
                self.known[name] = kwargs.pop(name)
            else:
                self.known[name] = self._default(param)
        if isinstance(p.star_arg, cst.Param):
            self.known[p.star_arg.name.value] = tuple(args)
        for param in p.kwonly_params:
            name = param.name.value
            self.known[name] = kwargs.pop(name) if name in kwargs else self._default(param)
        if isinstance(p.star_kwarg, cst.Param):
            self.known[p.star_kwarg.name.value] = kwargs

    def _default(self, param: cst.Param):
        return self.ev(param.default) if param.default is not None else UNKNOWN

    # -- statements ----------------------------------------------------------------------------
    def block(self, stmts) -> None:
        for stmt in stmts:
            self.stmt(stmt)

    def stmt(self, stmt) -> None:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                self.small(small)
        elif isinstance(stmt, cst.If):
            self.if_(stmt)
        elif isinstance(stmt, cst.For):
            self.for_(stmt)
        elif isinstance(stmt, cst.While):
            if self.truth(stmt.test) is False:
                return
            self.undecided([stmt.body.body], stmt, "a while loop")
        elif isinstance(stmt, cst.Try):
            self.block(stmt.body.body)
            if stmt.finalbody is not None:
                self.block(stmt.finalbody.body.body)
        elif isinstance(stmt, cst.With):
            self.block(stmt.body.body)
        elif isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
            self.known[stmt.name.value] = UNKNOWN

    def small(self, small) -> None:
        if isinstance(small, cst.Assign):
            value = self.ev(small.value)
            for target in small.targets:
                self.assign(target.target, value, small)
        elif isinstance(small, cst.AnnAssign):
            if small.value is not None:
                self.assign(small.target, self.ev(small.value), small)
        elif isinstance(small, cst.AugAssign):
            op = _AUGOPS.get(type(small.operator))
            old = self.ev(small.target)
            new = self.ev(small.value)
            value = UNKNOWN
            if op is not None and old is not UNKNOWN and new is not UNKNOWN:
                try:
                    value = op(old, new)
                except Exception:
                    value = UNKNOWN
            self.assign(small.target, value, small)
        elif isinstance(small, cst.Expr):
            self.ev(small.value)
        elif isinstance(small, cst.Return):
            raise _Return(self.ev(small.value) if small.value is not None else None)
        elif isinstance(small, cst.Raise):
            raise InterpretedRaise(self.site(small))
        elif isinstance(small, cst.Assert):
            if self.truth(small.test) is False:
                raise InterpretedRaise(self.site(small))
        elif isinstance(small, cst.Break):
            raise _Break()
        elif isinstance(small, cst.Continue):
            raise _Continue()
        elif isinstance(small, cst.ImportFrom) and not small.relative:
            from .parsed_source import _real

            base = dotted(small.module) if small.module is not None else ""
            if isinstance(small.names, cst.ImportStar):
                return
            for alias in small.names:
                name = alias.name.value if isinstance(alias.name, cst.Name) else None
                bound = alias.asname.name.value if alias.asname is not None else name
                if name and bound:
                    self.known[bound] = _real(base, name)

    def assign(self, target, value, stmt) -> None:
        if isinstance(target, cst.Name):
            self.known[target.value] = value
            return
        if isinstance(target, (cst.Tuple, cst.List)):
            elements = [e for e in target.elements]
            starred = any(isinstance(e, cst.StarredElement) for e in elements)
            if not starred and isinstance(value, (tuple, list)) and len(value) == len(elements):
                for e, v in zip(elements, value):
                    self.assign(e.value, v, stmt)
            else:
                for e in elements:
                    self.assign(e.value, UNKNOWN, stmt)
            return
        if isinstance(target, cst.Attribute):
            base = self.ev(target.value)
            name = target.attr.value
            if isinstance(base, StandIn):
                self.set_member(base, name, value, stmt)
            elif isinstance(base, nn.Module) and not _unknown(value):
                setattr(base, name, value)  # `self.norm.bias = None` on a module it built
            elif base is not UNKNOWN and _is_config(base) and value is not UNKNOWN:
                setattr(base, name, value)  # the model writes into its config (Falcon does)
            return
        if isinstance(target, cst.Subscript) and len(target.slice) == 1:
            # `self.rope_type[kind] = ...`: a plain container the code keeps
            base = self.ev(target.value)
            elem = target.slice[0].slice
            key = self.ev(elem.value) if isinstance(elem, cst.Index) else UNKNOWN
            if isinstance(base, dict) and not _unknown(key):
                if _unknown(value):
                    base.pop(key, None)
                else:
                    base[key] = value
            elif isinstance(base, list) and isinstance(key, int) and not _unknown(value):
                base[key] = value
        # others: nothing the stand-in keeps

    def set_member(self, obj: StandIn, name: str, value, stmt) -> None:
        unknowns = obj.static_unknowns()
        unknowns.pop(name, None)
        if isinstance(value, UnknownTensor):
            if name in obj._modules or name in obj._parameters or name in obj._buffers:
                delattr(obj, name)
            if value.kind == "buffer":
                obj.register_buffer(
                    name, torch.empty(0, device="meta"), persistent=value.persistent
                )
            unknowns[name] = f"{value.site}: the {value.kind}'s value is not known"
            obj.__dict__.setdefault("_static_unknown_tensors", {})[name] = value.kind
            return
        if value is UNKNOWN or isinstance(value, (_SuperProxy, _Method)):
            if name in obj._modules or name in obj._parameters or name in obj._buffers:
                delattr(obj, name)
            obj.__dict__.pop(name, None)
            unknowns[name] = f"{self.site(stmt)}: not known without running the code"
            return
        try:
            setattr(obj, name, value)
        except (TypeError, AttributeError):
            unknowns[name] = f"{self.site(stmt)}: cannot be kept on the stand-in"

    def if_(self, stmt: cst.If) -> None:
        decided = self.truth(stmt.test)
        orelse = stmt.orelse
        else_body = []
        if isinstance(orelse, cst.Else):
            else_body = orelse.body.body
        elif isinstance(orelse, cst.If):
            else_body = [orelse]
        if decided is True:
            self.block(stmt.body.body)
        elif decided is False:
            self.block(else_body)
        else:
            self.undecided(
                [stmt.body.body, else_body],
                stmt,
                f"the condition `{self.parsed.code(stmt.test, 70)}`",
            )

    def for_(self, stmt: cst.For) -> None:
        items = self.ev(stmt.iter)
        try:
            items = (
                list(items)
                if items is not UNKNOWN and not isinstance(items, (str, bytes))
                else UNKNOWN
            )
        except Exception:
            items = UNKNOWN
        if items is UNKNOWN or len(items) > MAX_LOOP:
            self.undecided(
                [stmt.body.body], stmt, f"the loop over `{self.parsed.code(stmt.iter, 70)}`"
            )
            return
        for item in items:
            self.assign(stmt.target, item, stmt)
            try:
                self.block(stmt.body.body)
            except _Break:
                return
            except _Continue:
                continue
        if isinstance(stmt.orelse, cst.Else):
            self.block(stmt.orelse.body.body)

    def undecided(self, bodies, stmt, what: str) -> None:
        """A branch or loop the interpretation cannot decide: harmless when it only computes
        local values (they become unknown), a gap when it builds or sets anything on self."""
        touched = [n for body in bodies for s in body for n in _walk(s) if _touches_self(n)]
        if touched:
            raise gap(
                "which modules the model builds",
                f"{what} is not decided by config.json (nor by what the parsed code computes "
                f"from it), and it sets `{self.parsed.code(touched[0], 60)}`",
                self.parsed.where(stmt),
            )
        for body in bodies:
            for s in body:
                for n in _walk(s):
                    if isinstance(n, cst.Return):
                        raise _Return(UNKNOWN)
                    if isinstance(n, (cst.Assign, cst.AugAssign, cst.AnnAssign, cst.For)):
                        targets = (
                            [t.target for t in n.targets] if isinstance(n, cst.Assign) else
                            [n.target]
                        )  # fmt: skip
                        for t in targets:
                            for name in _names(t):
                                self.known[name] = UNKNOWN

    # -- expressions ---------------------------------------------------------------------------
    def ev(self, node) -> Any:
        return self.value(node)

    def value(self, node: cst.BaseExpression) -> object:
        try:
            return self._value(node)
        except (InterpretedRaise, InferenceError, _Return, _Break, _Continue):
            raise
        except Exception:
            return UNKNOWN

    def truth(self, node) -> bool | None:
        v = self.value(node)
        if v is UNKNOWN or isinstance(v, UnknownTensor):
            return None
        try:
            return bool(v)
        except Exception:
            return None

    def _value(self, node):
        if isinstance(node, (cst.SimpleString, cst.ConcatenatedString)):
            v = node.evaluated_value
            return UNKNOWN if v is None else v
        if isinstance(node, (cst.Integer, cst.Float, cst.Imaginary)):
            return ast.literal_eval(node.value)
        if isinstance(node, cst.FormattedString):
            return self._fstring(node)
        if isinstance(node, cst.Name):
            name = node.value
            if name in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[name]
            if name in self.known:
                return self.known[name]
            return self.scope(name)
        if isinstance(node, cst.Attribute):
            base = self._value(node.value)
            name = node.attr.value
            if base is UNKNOWN or isinstance(base, UnknownTensor):
                return UNKNOWN
            if isinstance(base, _SuperProxy):
                return _Method("super", base.obj, name, base.owner)
            if isinstance(base, ParsedClass):
                if name in base.methods:
                    return _Method("unbound", None, name, base)
                attrs = base.class_attrs()
                if name in attrs:
                    return self.builder.module_value(attrs[name], base.module)
                return UNKNOWN
            if isinstance(base, ParsedModule) or isinstance(base, ParsedFunction):
                return UNKNOWN
            if isinstance(base, StandIn):
                if name == "training":
                    return False
                if name in base.static_unknowns():
                    return UNKNOWN
                if _stand_in_method(base, name):
                    return _Method("bound", base, name)
            if isinstance(base, type) and name == "__init__":
                return _Method("unbound", None, name, base)
            got = getattr(base, name, UNKNOWN)
            return got
        if isinstance(node, cst.Subscript):
            base = self._value(node.value)
            if _unknown(base):
                return UNKNOWN
            keys = []
            for element in node.slice:
                elem = element.slice
                if isinstance(elem, cst.Index):
                    key = self._value(elem.value)
                elif isinstance(elem, cst.Slice):
                    parts = [
                        self._value(p) if p is not None else None
                        for p in (elem.lower, elem.upper, elem.step)
                    ]
                    key = UNKNOWN if any(_unknown(p) for p in parts) else slice(*parts)
                else:
                    key = UNKNOWN
                if _unknown(key):
                    return UNKNOWN
                keys.append(key)
            return base[keys[0] if len(keys) == 1 else tuple(keys)]
        if isinstance(node, cst.BinaryOperation):
            left, right = self._value(node.left), self._value(node.right)
            op = _BINOPS.get(type(node.operator))
            if op is None or _unknown(left) or _unknown(right):
                return UNKNOWN
            return op(left, right)
        if isinstance(node, cst.UnaryOperation):
            v = self._value(node.expression)
            if _unknown(v):
                return UNKNOWN
            if isinstance(node.operator, cst.Not):
                return not v
            if isinstance(node.operator, cst.Minus):
                return -v
            if isinstance(node.operator, cst.Plus):
                return +v
            if isinstance(node.operator, cst.BitInvert):
                return ~v
            return UNKNOWN
        if isinstance(node, cst.IfExp):
            decided = self.truth(node.test)
            if decided is None:
                return UNKNOWN
            return self._value(node.body if decided else node.orelse)
        if isinstance(node, (cst.Tuple, cst.List, cst.Set)):
            items = []
            for e in node.elements:
                v = self._value(e.value)
                if isinstance(e, cst.StarredElement):
                    if _unknown(v):
                        return UNKNOWN
                    items.extend(v)
                else:
                    items.append(v)
            if isinstance(node, cst.Tuple):
                return tuple(items)
            if isinstance(node, cst.Set):
                return UNKNOWN if any(_unknown(i) for i in items) else set(items)
            return items
        if isinstance(node, cst.Dict):
            out = {}
            for e in node.elements:
                if isinstance(e, cst.StarredDictElement):
                    v = self._value(e.value)
                    if not isinstance(v, dict):
                        return UNKNOWN
                    out.update(v)
                    continue
                k = self._value(e.key)
                if _unknown(k):
                    return UNKNOWN
                out[k] = self._value(e.value)
            return out
        if isinstance(node, (cst.ListComp, cst.GeneratorExp, cst.SetComp, cst.DictComp)):
            return self._comprehension(node)
        if isinstance(node, (cst.BooleanOperation, cst.Comparison)):
            return super()._value(node)
        if isinstance(node, cst.Call):
            return self._call(node)
        return UNKNOWN

    def _fstring(self, node: cst.FormattedString):
        out = []
        for part in node.parts:
            if isinstance(part, cst.FormattedStringText):
                out.append(part.value)
                continue
            value = self._value(part.expression)
            if _unknown(value) or not isinstance(value, (str, int, float, bool, type(None))):
                return UNKNOWN
            if part.conversion == "r":
                value = repr(value)
            elif part.conversion == "s":
                value = str(value)
            spec = ""
            if part.format_spec:
                if not all(isinstance(p, cst.FormattedStringText) for p in part.format_spec):
                    return UNKNOWN
                spec = "".join(p.value for p in part.format_spec)
            out.append(format(value, spec))
        return "".join(out)

    def _comprehension(self, node):
        results = []
        saved = dict(self.known)
        try:
            self._comp_loop(node, node.for_in, results)
        except _CompUnknown:
            return UNKNOWN
        finally:
            self.known = saved
        if isinstance(node, cst.DictComp):
            return dict(results)
        if isinstance(node, cst.SetComp):
            return set(results)
        return results

    def _comp_loop(self, node, for_in: cst.CompFor, results: list) -> None:
        items = self._value(for_in.iter)
        if _unknown(items):
            raise _CompUnknown()
        for item in list(items)[:MAX_LOOP]:
            self.assign(for_in.target, item, node)
            if any(self.truth(c.test) is not True for c in for_in.ifs):
                if any(self.truth(c.test) is None for c in for_in.ifs):
                    raise _CompUnknown()
                continue
            if for_in.inner_for_in is not None:
                self._comp_loop(node, for_in.inner_for_in, results)
            elif isinstance(node, cst.DictComp):
                results.append((self._value(node.key), self._value(node.value)))
            else:
                results.append(self._value(node.elt))

    def _args(self, node: cst.Call):
        args, kwargs = [], {}
        for a in node.args:
            v = self._value(a.value)
            if a.star == "*":
                if _unknown(v):
                    return None
                args.extend(v)
            elif a.star == "**":
                if not isinstance(v, dict):
                    return None
                kwargs.update(v)
            elif a.keyword is not None:
                kwargs[a.keyword.value] = v
            else:
                args.append(v)
        return args, kwargs

    def _call(self, node: cst.Call):
        func = node.func
        if isinstance(func, cst.Name) and func.value == "super" and func.value not in self.known:
            if self.owner is None or self.self_obj is None:
                return UNKNOWN
            return _SuperProxy(self.owner, self.self_obj)
        callee = self._value(func)
        parsed_args = self._args(node)
        if parsed_args is None:
            return UNKNOWN
        args, kwargs = parsed_args
        site = self.site(node)
        if isinstance(callee, _Method):
            return self._call_method(callee, args, kwargs, site)
        if callee is UNKNOWN:
            return UNKNOWN
        if isinstance(callee, ParsedClass):
            return self.builder.construct(callee, args, kwargs, site)
        if isinstance(callee, ParsedFunction):
            scope = _parsed_scope(self.builder, callee.module)
            return self.builder.run_function(callee.node, scope, callee.module.parsed, None,
                                             None, args, kwargs)  # fmt: skip
        if isinstance(callee, type):
            if issubclass(callee, nn.Module) or callee is nn.Parameter or _is_buffer_class(callee):
                return self.builder.construct(callee, args, kwargs, site)
            if callee in _SAFE_BUILTINS and not (_has_unknown(args) or _has_unknown(kwargs)):
                return callee(*args, **kwargs)
            return UNKNOWN
        if _has_unknown(args) or _has_unknown(kwargs):
            if callee is setattr and len(args) == 3 and isinstance(args[0], StandIn):
                if isinstance(args[1], str):
                    self.set_member(args[0], args[1], args[2], node)
                return None
            if callee in (isinstance, hasattr, getattr) and args and not _unknown(args[0]):
                pass  # the object is known; getattr(obj, "x", UNKNOWN) is fine
            else:
                return UNKNOWN
        if callee is setattr and len(args) == 3 and isinstance(args[1], str):
            if isinstance(args[0], StandIn):
                self.set_member(args[0], args[1], args[2], node)
            elif _is_config(args[0]):
                setattr(*args)
            return None
        if callee in _SAFE_BUILTINS:
            if callee is getattr and isinstance(args[0] if args else None, StandIn):
                name = args[1] if len(args) > 1 else None
                if isinstance(name, str) and name in args[0].static_unknowns():
                    return UNKNOWN
            return callee(*args, **kwargs)
        module = getattr(callee, "__module__", None) or ""
        name = getattr(callee, "__name__", "")
        if module == "math" or getattr(callee, "__self__", None) is math:
            return callee(*args, **kwargs)
        if module == "copy" and name in ("copy", "deepcopy") and _is_config(args[0] if args else 0):
            return callee(*args, **kwargs)  # a config copied to change it (one per rope theta)
        if (
            module.startswith("torch") or getattr(callee, "__self__", None) is torch
        ) and name in _TORCH_FACTORIES:
            kwargs.pop("device", None)
            with torch.device("meta"):
                return callee(*args, **kwargs)
        owner = getattr(callee, "__self__", None)
        if owner is not None and not isinstance(owner, type):
            if isinstance(owner, _PLAIN) or isinstance(owner, torch.Tensor):
                if isinstance(owner, torch.Tensor) and name in (
                    "to",
                    "cuda",
                    "cpu",
                    "numpy",
                    "tolist",
                    "item",
                ):
                    return UNKNOWN if name in ("numpy", "tolist", "item") else owner
                return callee(*args, **kwargs)
            if _is_config(owner) and name in ("get_text_config", "get"):
                return callee(*args, **kwargs)
            if (
                isinstance(owner, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
                and name in _CONTAINER_METHODS
            ):
                return callee(*args, **kwargs)
        if module in _TRANSFORMERS_FUNCTIONS and inspect.isfunction(callee):
            # library code (a config check, a rope initialiser) on known values; never
            # transformers' loaders (get_class_from_dynamic_module would import code, hub
            # functions would download) nor its is_*_available checks (they answer for this
            # machine, not the one the model runs on)
            try:
                with torch.device("meta"):
                    return callee(*args, **kwargs)
            except Exception:
                return UNKNOWN
        return UNKNOWN

    def _call_method(self, m: _Method, args, kwargs, site):
        builder = self.builder
        if not isinstance(m.obj, StandIn) and m.kind in ("super", "bound"):
            return None  # a config's own base class (the library's): nothing to interpret
        if m.kind == "super":
            if m.name == "__init__":
                builder.init_after(m.obj, m.owner, args, kwargs)
                return None
            mro = list(type(m.obj)._static_mro)
            start = mro.index(m.owner) + 1 if m.owner in mro else len(mro)
            return self._run_method(m.obj, m.name, mro[start:], args, kwargs)
        if m.kind == "unbound":
            cls = m.owner
            if m.name == "__init__":
                if not args or not isinstance(args[0], StandIn):
                    return UNKNOWN
                mro = builder.code.mro(cls) if isinstance(cls, ParsedClass) else list(cls.__mro__)
                builder.initialise(args[0], mro, args[1:], kwargs)
                return None
            return UNKNOWN
        obj = m.obj  # bound to a stand-in
        if m.name == "register_buffer":
            name = args[0] if args else kwargs.get("name")
            tensor = args[1] if len(args) > 1 else kwargs.get("tensor")
            persistent = args[2] if len(args) > 2 else kwargs.get("persistent", True)
            if not isinstance(name, str):
                return UNKNOWN
            if isinstance(tensor, torch.Tensor) or tensor is None:
                obj.register_buffer(name, tensor, persistent=persistent is not False)
            else:
                self.set_member(
                    obj, name, UnknownTensor("buffer", site, persistent is not False), None
                )
            return None
        if m.name in ("register_parameter", "add_module", "register_module"):
            name = args[0] if args else None
            value = args[1] if len(args) > 1 else None
            if isinstance(name, str):
                self.set_member(obj, name, value, None) if value is not None else None
            return None
        return self._run_method(obj, m.name, type(obj)._static_mro, args, kwargs)

    def _run_method(self, obj, name, mro, args, kwargs):
        owner = method_owner(mro, name)
        if owner is None:
            return UNKNOWN
        builder = self.builder
        if isinstance(owner, ParsedClass):
            func = owner.methods[name]
            scope = _parsed_scope(builder, owner.module)
            parsed = owner.module.parsed
        elif owner.__module__.startswith("transformers.models."):
            try:
                parsed, _, func = builder.index.find_method(owner, name)
            except InferenceError:
                return UNKNOWN
            scope = _real_scope(sys.modules[owner.__module__])
        else:
            return UNKNOWN  # nn.Module's own methods (post_init, apply, ...): structure-neutral
        if any(dotted(d.decorator) == "property" for d in func.decorators):
            return UNKNOWN
        return builder.run_function(func, scope, parsed, owner, obj, args, kwargs)


def _stand_in_method(obj: StandIn, name: str) -> bool:
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


def _unknown(v) -> bool:
    return v is UNKNOWN or isinstance(v, UnknownTensor)


def _is_config(obj) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, (cst.FunctionDef, cst.ClassDef, cst.Lambda)) and n is not node:
            continue
        stack.extend(reversed(list(n.children)))


def _touches_self(n) -> bool:
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


def _names(target) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in _names(e.value)]
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
