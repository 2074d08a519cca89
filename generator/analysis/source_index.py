"""Parsed modeling sources: classes and methods by name, with line numbers for evidence.

Files are parsed with libcst and never imported or executed by this module.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from ..errors import InferenceError


@dataclass
class ParsedFile:
    path: Path
    display: str  # path shown in evidence (relative to transformers when possible)
    module: cst.Module
    positions: dict
    classes: dict[str, cst.ClassDef]

    def line(self, node: cst.CSTNode) -> int:
        pos = self.positions.get(node)
        return pos.start.line if pos is not None else 0

    def where(self, node: cst.CSTNode) -> str:
        return f"{self.display}:{self.line(node)}"

    def code(self, node: cst.CSTNode, limit: int = 90) -> str:
        """One-line source text of `node`, shortened for evidence."""
        text = " ".join(self.module.code_for_node(node).split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def method(self, class_name: str, method_name: str) -> cst.FunctionDef | None:
        cls = self.classes.get(class_name)
        if cls is None:
            return None
        for stmt in cls.body.body:
            if isinstance(stmt, cst.FunctionDef) and stmt.name.value == method_name:
                return stmt
        return None


class SourceIndex:
    """Caches parsed files; `display` maps an absolute path to the path shown in evidence."""

    def __init__(self, display=None):
        self._display = display or (lambda p: Path(p).name)

    @functools.lru_cache(maxsize=None)
    def parse(self, path: str) -> ParsedFile:
        text = Path(path).read_text(encoding="utf-8")
        wrapper = MetadataWrapper(cst.parse_module(text), unsafe_skip_copy=True)
        positions = wrapper.resolve(PositionProvider)
        module = wrapper.module
        classes = {stmt.name.value: stmt for stmt in module.body if isinstance(stmt, cst.ClassDef)}
        return ParsedFile(Path(path), self._display(path), module, dict(positions), classes)

    def defining_class(self, cls: type, method_name: str) -> type:
        """The class in `cls`'s MRO whose body defines `method_name`."""
        for klass in cls.__mro__:
            fn = vars(klass).get(method_name)
            if fn is None:
                continue
            # transformers' GradientCheckpointingLayer.__init_subclass__ puts a functools.wraps
            # wrapper of the inherited forward into every subclass: not a definition of its own
            qualname = getattr(fn, "__qualname__", "")
            if hasattr(fn, "__wrapped__") and not qualname.startswith(f"{klass.__qualname__}."):
                continue
            return klass
        raise InferenceError(f"{cls.__name__}.{method_name}", "no class in the MRO defines it")

    def find_method(self, cls: type, method_name: str) -> tuple[ParsedFile, str, cst.FunctionDef]:
        """Source of `cls.method_name` as defined along the MRO: (file, class name, FunctionDef)."""
        klass = self.defining_class(cls, method_name)
        path = inspect.getsourcefile(klass)
        if path is None:
            raise InferenceError(
                f"{klass.__name__}.{method_name}", "its source file is not available"
            )
        parsed = self.parse(str(Path(path).resolve()))
        func = parsed.method(klass.__name__, method_name)
        if func is None:
            raise InferenceError(
                f"{klass.__name__}.{method_name}",
                f"not found as a plain method of class {klass.__name__} in {parsed.display}",
            )
        return parsed, klass.__name__, func


def dotted(node: cst.BaseExpression) -> str | None:
    """`a.b.c` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if isinstance(node, cst.Name):
        parts.append(node.value)
        return ".".join(reversed(parts))
    return None


def param_names(func: cst.FunctionDef) -> list[str]:
    p = func.params
    return [x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)]
