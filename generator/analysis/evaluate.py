"""Decide branch conditions of model code from the probed instance, without running model code.

Structure can depend on config values (Falcon's `parallel_attn`, GPT-NeoX's
`use_parallel_residual`, OPT's `do_layer_norm_before`). A condition is decided when it only reads
literals, attributes of `self` (looked up on the probed module instance) and optional forward
arguments that a decoder-only model leaves at None; anything else is UNKNOWN and the analysis
follows both branches.
"""

from __future__ import annotations

import ast
import operator

import libcst as cst


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
_MISSING = object()

_COMPARE = {
    cst.Is: operator.is_,
    cst.IsNot: operator.is_not,
    cst.Equal: operator.eq,
    cst.NotEqual: operator.ne,
    cst.LessThan: operator.lt,
    cst.LessThanEqual: operator.le,
    cst.GreaterThan: operator.gt,
    cst.GreaterThanEqual: operator.ge,
    cst.In: lambda a, b: a in b,
    cst.NotIn: lambda a, b: a not in b,
}


class Evaluator:
    """Evaluates expressions against `instance` (bound to `self`) and known local names."""

    def __init__(self, instance: object, known: dict[str, object] | None = None):
        self.instance = instance
        self.known = {"self": instance, **(known or {})}

    def self_attr(self, path: list[str]) -> object:
        if path == ["training"]:
            return False  # descriptors describe the inference structure
        obj = self.instance
        for name in path:
            obj = _safe_getattr(obj, name)
            if obj is _MISSING:
                return UNKNOWN
        return obj

    def value(self, node: cst.BaseExpression) -> object:
        try:
            return self._value(node)
        except Exception:  # an operator applied to incompatible known values
            return UNKNOWN

    def truth(self, node: cst.BaseExpression) -> bool | None:
        """True/False when decidable, else None."""
        v = self.value(node)
        if v is UNKNOWN:
            return None
        try:
            return bool(v)
        except Exception:
            return None

    def _value(self, node: cst.BaseExpression) -> object:
        if isinstance(node, (cst.Integer, cst.Float, cst.SimpleString)):
            return ast.literal_eval(node.value)
        if isinstance(node, cst.Name):
            if node.value in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.value]
            return self.known.get(node.value, UNKNOWN)
        if isinstance(node, cst.Attribute):
            path = _self_path(node)
            if path is not None:
                return self.self_attr(path)
            base = self._value(node.value)
            if base is UNKNOWN:
                return UNKNOWN
            got = _safe_getattr(base, node.attr.value)
            return UNKNOWN if got is _MISSING else got
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Not):
            v = self._value(node.expression)
            return UNKNOWN if v is UNKNOWN else (not v)
        if isinstance(node, cst.BooleanOperation):
            left = self._value(node.left)
            is_and = isinstance(node.operator, cst.And)
            if left is not UNKNOWN and (bool(left) is not is_and):
                return left  # short circuit: `False and x`, `True or x`
            right = self._value(node.right)
            if left is UNKNOWN:
                # `x and False` is False and `x or True` is True whatever x is
                if right is not UNKNOWN and bool(right) is not is_and:
                    return right
                return UNKNOWN
            return right
        if isinstance(node, cst.Comparison):
            left = self._value(node.left)
            for target in node.comparisons:
                right = self._value(target.comparator)
                if left is UNKNOWN or right is UNKNOWN:
                    return UNKNOWN
                op = _COMPARE.get(type(target.operator))
                if op is None or not op(left, right):
                    return False if op is not None else UNKNOWN
                left = right
            return True
        if isinstance(node, cst.Call):
            return self._call(node)
        if isinstance(node, cst.Subscript) and len(node.slice) == 1:
            base = self._value(node.value)
            elem = node.slice[0].slice
            if base is UNKNOWN or not isinstance(elem, cst.Index):
                return UNKNOWN
            key = self._value(elem.value)
            return UNKNOWN if key is UNKNOWN else base[key]
        return UNKNOWN

    def _call(self, node: cst.Call) -> object:
        func = node.func
        if not isinstance(func, cst.Name):
            return UNKNOWN
        args = [self._value(a.value) for a in node.args]
        if func.value == "hasattr" and len(args) == 2:
            if args[0] is UNKNOWN or not isinstance(args[1], str):
                return UNKNOWN
            return _safe_getattr(args[0], args[1]) is not _MISSING
        if func.value == "getattr" and len(args) in (2, 3):
            if args[0] is UNKNOWN or not isinstance(args[1], str):
                return UNKNOWN
            got = _safe_getattr(args[0], args[1])
            if got is _MISSING:
                return args[2] if len(args) == 3 else UNKNOWN
            return got
        if func.value == "len" and len(args) == 1 and args[0] is not UNKNOWN:
            return len(args[0])
        return UNKNOWN


def _self_path(node: cst.BaseExpression) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if isinstance(node, cst.Name) and node.value == "self":
        return list(reversed(parts))
    return None


def _safe_getattr(obj: object, name: str) -> object:
    try:
        return getattr(obj, name)
    except Exception:
        return _MISSING
