"""Expressions and calls of the static interpreter: values from literals, the config, arithmetic
and the library calls that only build modules or tensors on the meta device; anything else stays
unknown."""

from __future__ import annotations

import ast
import inspect
import math
import operator
import sys
from typing import Any

import libcst as cst
import torch
from torch import nn

from .analysis.evaluate import UNKNOWN, Evaluator
from .analysis.source_index import dotted
from .errors import InferenceError
from .parsed_source import (
    ParsedClass,
    ParsedFunction,
    ParsedModule,
)
from .static_standins import (
    MAX_LOOP,
    BreakSignal,
    ContinueSignal,
    InterpretedRaise,
    ReturnSignal,
    StandIn,
    UnknownTensor,
    has_unknown,
    is_buffer_class,
    is_config,
    is_unknown,
    method_owner,
    parsed_scope,
    real_scope,
    stand_in_method,
)

_BINOPS = {
    cst.Add: operator.add, cst.Subtract: operator.sub, cst.Multiply: operator.mul,
    cst.Divide: operator.truediv, cst.FloorDivide: operator.floordiv, cst.Modulo: operator.mod,
    cst.Power: operator.pow, cst.LeftShift: operator.lshift, cst.RightShift: operator.rshift,
    cst.BitOr: operator.or_, cst.BitAnd: operator.and_, cst.BitXor: operator.xor,
    cst.MatrixMultiply: operator.matmul,
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


class SuperProxy:
    def __init__(self, owner, obj):
        self.owner, self.obj = owner, obj


class BoundMethod:
    """A method of a stand-in or of a parsed class, bound for interpretation."""

    def __init__(self, kind, obj, name, owner=None):
        self.kind, self.obj, self.name, self.owner = kind, obj, name, owner


class Expressions(Evaluator):
    """The expression half of an interpreted frame (see static_interpret.Frame)."""

    # -- expressions ---------------------------------------------------------------------------
    def ev(self, node) -> Any:
        return self.value(node)

    def value(self, node: cst.BaseExpression) -> object:
        try:
            return self._value(node)
        except (InterpretedRaise, InferenceError, ReturnSignal, BreakSignal, ContinueSignal):
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
            if isinstance(base, SuperProxy):
                return BoundMethod("super", base.obj, name, base.owner)
            if isinstance(base, ParsedClass):
                if name in base.methods:
                    return BoundMethod("unbound", None, name, base)
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
                if stand_in_method(base, name):
                    return BoundMethod("bound", base, name)
            if isinstance(base, type) and name == "__init__":
                return BoundMethod("unbound", None, name, base)
            got = getattr(base, name, UNKNOWN)
            return got
        if isinstance(node, cst.Subscript):
            base = self._value(node.value)
            if is_unknown(base):
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
                    key = UNKNOWN if any(is_unknown(p) for p in parts) else slice(*parts)
                else:
                    key = UNKNOWN
                if is_unknown(key):
                    return UNKNOWN
                keys.append(key)
            return base[keys[0] if len(keys) == 1 else tuple(keys)]
        if isinstance(node, cst.BinaryOperation):
            left, right = self._value(node.left), self._value(node.right)
            op = _BINOPS.get(type(node.operator))
            if op is None or is_unknown(left) or is_unknown(right):
                return UNKNOWN
            return op(left, right)
        if isinstance(node, cst.UnaryOperation):
            v = self._value(node.expression)
            if is_unknown(v):
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
                    if is_unknown(v):
                        return UNKNOWN
                    items.extend(v)
                else:
                    items.append(v)
            if isinstance(node, cst.Tuple):
                return tuple(items)
            if isinstance(node, cst.Set):
                return UNKNOWN if any(is_unknown(i) for i in items) else set(items)
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
                if is_unknown(k):
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
            if is_unknown(value) or not isinstance(value, (str, int, float, bool, type(None))):
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
        if is_unknown(items):
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
                if is_unknown(v):
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
            return SuperProxy(self.owner, self.self_obj)
        callee = self._value(func)
        parsed_args = self._args(node)
        if parsed_args is None:
            return UNKNOWN
        args, kwargs = parsed_args
        site = self.site(node)
        if isinstance(callee, BoundMethod):
            return self._call_method(callee, args, kwargs, site)
        if callee is UNKNOWN:
            return UNKNOWN
        if isinstance(callee, ParsedClass):
            return self.builder.construct(callee, args, kwargs, site)
        if isinstance(callee, ParsedFunction):
            scope = parsed_scope(self.builder, callee.module)
            return self.builder.run_function(callee.node, scope, callee.module.parsed, None,
                                             None, args, kwargs)  # fmt: skip
        if isinstance(callee, type):
            if issubclass(callee, nn.Module) or callee is nn.Parameter or is_buffer_class(callee):
                return self.builder.construct(callee, args, kwargs, site)
            if callee in _SAFE_BUILTINS and not (has_unknown(args) or has_unknown(kwargs)):
                return callee(*args, **kwargs)
            return UNKNOWN
        if has_unknown(args) or has_unknown(kwargs):
            if callee is setattr and len(args) == 3 and isinstance(args[0], StandIn):
                if isinstance(args[1], str):
                    self.set_member(args[0], args[1], args[2], node)
                return None
            if callee in (isinstance, hasattr, getattr) and args and not is_unknown(args[0]):
                pass  # the object is known; getattr(obj, "x", UNKNOWN) is fine
            else:
                return UNKNOWN
        if callee is setattr and len(args) == 3 and isinstance(args[1], str):
            if isinstance(args[0], StandIn):
                self.set_member(args[0], args[1], args[2], node)
            elif is_config(args[0]):
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
        if module == "copy" and name in ("copy", "deepcopy") and is_config(args[0] if args else 0):
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
            if is_config(owner) and name in ("get_text_config", "get"):
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

    def _call_method(self, m: BoundMethod, args, kwargs, site):
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
            scope = parsed_scope(builder, owner.module)
            parsed = owner.module.parsed
        elif owner.__module__.startswith("transformers.models."):
            try:
                parsed, _, func = builder.index.find_method(owner, name)
            except InferenceError:
                return UNKNOWN
            scope = real_scope(sys.modules[owner.__module__])
        else:
            return UNKNOWN  # nn.Module's own methods (post_init, apply, ...): structure-neutral
        if any(dotted(d.decorator) == "property" for d in func.decorators):
            return UNKNOWN
        return builder.run_function(func, scope, parsed, owner, obj, args, kwargs)
