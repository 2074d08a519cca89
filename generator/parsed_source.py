"""A checkpoint's own code, parsed with libcst and never imported: its classes, the names each
file binds, class hierarchies, and method lookup for the analysis.

Names a file imports from `torch`, `transformers` or `math` are real objects (library code the
user already runs); names it defines are `ParsedClass` / `ParsedFunction` nodes; anything else
(another package, a name bound at run time) is UNKNOWN. Nothing of the checkpoint's files is
executed: not its module bodies, not its class bodies, not its functions.
"""

from __future__ import annotations

import builtins
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

from .analysis.evaluate import UNKNOWN
from .analysis.source_index import ParsedFile, SourceIndex, dotted
from .errors import InferenceError, StaticGap

# Library roots whose objects a parsed file may name: importing these runs library code the user
# already runs (puzzle-gen imports them itself), never the checkpoint's own code.
REAL_ROOTS = ("torch", "transformers", "math", "copy")
REMOTE_PREFIX = "transformers_modules"
_SAFE = re.compile(r"[^A-Za-z0-9_]")


def gap(fact: str, reason: str, where: str | None = None) -> StaticGap:
    return StaticGap(fact, reason + (f" ({where})" if where else ""))


@dataclass(eq=False)
class ParsedClass:
    """A class defined in one of the checkpoint's files."""

    name: str
    module: "ParsedModule"
    node: cst.ClassDef

    def __repr__(self) -> str:
        return f"<parsed class {self.module.stem}.{self.name}>"

    @property
    def methods(self) -> dict[str, cst.FunctionDef]:
        return {s.name.value: s for s in self.node.body.body if isinstance(s, cst.FunctionDef)}

    def class_attrs(self) -> dict[str, cst.BaseExpression]:
        """`name = value` statements of the class body (the values are not evaluated here)."""
        out = {}
        for stmt in self.node.body.body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                continue
            for small in stmt.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name):
                        out[target.value] = small.value
                elif isinstance(small, cst.AnnAssign) and small.value is not None:
                    if isinstance(small.target, cst.Name):
                        out[small.target.value] = small.value
        return out

    def field_defaults(self) -> dict[str, cst.BaseExpression]:
        """`name: type = value` statements of the class body (a dataclass-style config's
        fields and their defaults)."""
        out = {}
        for stmt in self.node.body.body:
            if isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    if (
                        isinstance(small, cst.AnnAssign)
                        and small.value is not None
                        and isinstance(small.target, cst.Name)
                    ):
                        out[small.target.value] = small.value
        return out

    def where(self, node: cst.CSTNode | None = None) -> str:
        return self.module.parsed.where(node if node is not None else self.node)


@dataclass(eq=False)
class ParsedFunction:
    """A module-level function of one of the checkpoint's files."""

    name: str
    module: "ParsedModule"
    node: cst.FunctionDef

    def __repr__(self) -> str:
        return f"<parsed function {self.module.stem}.{self.name}>"


@dataclass(eq=False)
class ParsedModule:
    stem: str
    path: Path
    parsed: ParsedFile
    remote_name: str  # what transformers would call the module once imported
    bindings: dict = field(
        default_factory=dict
    )  # name -> ("class"|"function"|"import"|"expr", ...)


class ParsedCode:
    """Every file config.json's auto_map reaches, parsed, with their names resolved lazily."""

    def __init__(self, files, directory: Path, index: SourceIndex):
        self.directory = Path(directory)
        self.index = index
        package = _SAFE.sub("_", self.directory.name) or "checkpoint"
        if package[0].isdigit():
            package = "_" + package
        self.package = f"{REMOTE_PREFIX}.{package}"
        self.modules: dict[str, ParsedModule] = {}
        for path in files:
            path = Path(path)
            parsed = index.parse(str(path.resolve()))
            module = ParsedModule(path.stem, path, parsed, f"{self.package}.{path.stem}")
            self.modules[path.stem] = module
            self._bind(module, parsed.module.body)
        self._resolving: set = set()
        self._mro: dict = {}

    # -- module-level names ---------------------------------------------------------------------
    def _bind(self, module: ParsedModule, body) -> None:
        for stmt in body:
            if isinstance(stmt, cst.ClassDef):
                module.bindings[stmt.name.value] = (
                    "class",
                    ParsedClass(stmt.name.value, module, stmt),
                )
            elif isinstance(stmt, cst.FunctionDef):
                module.bindings[stmt.name.value] = (
                    "function",
                    ParsedFunction(stmt.name.value, module, stmt),
                )
            elif isinstance(stmt, cst.If):
                # bound only when a condition holds at import time (TYPE_CHECKING, an
                # installed package): which binding holds is not read, so none is
                for name in self._names_bound(module, stmt):
                    module.bindings[name] = ("unknown",)
            elif isinstance(stmt, cst.Try):
                # `try: import x / X = ...` with a fallback: the try body's bindings hold
                # unless a handler rebinds the name (then it depends on what is installed)
                self._bind(module, stmt.body.body)
                for handler in (*stmt.handlers, stmt.orelse):
                    if handler is not None:
                        for name in self._names_bound(module, handler):
                            module.bindings[name] = ("unknown",)
            elif isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    self._bind_small(module, small)

    def _names_bound(self, module: ParsedModule, node) -> set[str]:
        """Every name the module-level statements inside `node` bind."""
        scratch = ParsedModule(module.stem, module.path, module.parsed, module.remote_name)
        body = node.body.body if hasattr(node.body, "body") else node.body
        self._bind(scratch, body)
        names = set(scratch.bindings)
        orelse = getattr(node, "orelse", None)
        if orelse is not None:
            names |= self._names_bound(module, orelse)
        return names

    def _bind_small(self, module: ParsedModule, small) -> None:
        if isinstance(small, cst.Import):
            for alias in small.names:
                name = dotted(alias.name)
                if name is None:
                    continue
                if alias.asname is not None:
                    module.bindings[alias.asname.name.value] = ("import", name, None)
                else:
                    head = name.split(".")[0]
                    module.bindings[head] = ("import", head, None)
        elif isinstance(small, cst.ImportFrom):
            if isinstance(small.names, cst.ImportStar):
                return
            base = dotted(small.module) if small.module is not None else ""
            relative = len(small.relative)
            for alias in small.names:
                name = alias.name.value if isinstance(alias.name, cst.Name) else dotted(alias.name)
                bound = alias.asname.name.value if alias.asname is not None else name
                if relative:
                    module.bindings[bound] = ("relative", relative, base or "", name)
                else:
                    module.bindings[bound] = ("import", base, name)
        elif isinstance(small, cst.Assign) and len(small.targets) == 1:
            target = small.targets[0].target
            if isinstance(target, cst.Name):
                module.bindings[target.value] = ("expr", small.value)
        elif isinstance(small, cst.AnnAssign) and small.value is not None:
            if isinstance(small.target, cst.Name):
                module.bindings[small.target.value] = ("expr", small.value)

    def resolve(self, module: ParsedModule, name: str, evaluate=None):
        """The object `name` is bound to at module level in `module`: a ParsedClass or
        ParsedFunction, a real object from torch / transformers / math, a builtin, or UNKNOWN.
        `evaluate(expr, module)` evaluates a module-level `NAME = expr` (a dispatch table)."""
        binding = module.bindings.get(name)
        if binding is None:
            if name in _BUILTINS:
                return getattr(builtins, name)
            return UNKNOWN
        kind = binding[0]
        if kind in ("class", "function"):
            return binding[1]
        if kind == "import":
            _, base, attr = binding
            return _real(base, attr)
        if kind == "relative":
            _, level, base, attr = binding
            if level != 1:
                return UNKNOWN
            if not base:  # from . import x: a sibling module
                return UNKNOWN
            other = self.modules.get(base.split(".")[-1])
            if other is None:
                return UNKNOWN
            return self.resolve(other, attr, evaluate)
        if kind == "expr" and evaluate is not None:
            key = (module.stem, name)
            if key in self._resolving:
                return UNKNOWN
            self._resolving.add(key)
            try:
                return evaluate(binding[1], module)
            finally:
                self._resolving.discard(key)
        return UNKNOWN

    def class_named(self, stem: str, name: str) -> ParsedClass:
        module = self.modules.get(stem)
        binding = module.bindings.get(name) if module else None
        if binding is None or binding[0] != "class":
            raise InferenceError(f"class {name}", f"{stem}.py does not define it")
        return binding[1]

    # -- class hierarchies ----------------------------------------------------------------------
    def bases(self, cls) -> list:
        """Direct bases of a parsed class (resolved) or a real class."""
        if isinstance(cls, type):
            return list(cls.__bases__)
        out = []
        for arg in cls.node.bases:
            if arg.keyword is not None:
                continue
            value = self.resolve_expr(cls.module, arg.value)
            if isinstance(value, (ParsedClass, type)):
                out.append(value)
                continue
            raise gap(
                f"the base classes of {cls.name}",
                f"`{cls.module.parsed.code(arg.value)}` does not name a class the parse can "
                "resolve (a class of the checkpoint's files, torch or transformers)",
                cls.where(),
            )
        return out or [object]

    def resolve_expr(self, module: ParsedModule, expr: cst.BaseExpression):
        """A Name or dotted Attribute chain, resolved: `nn.Module`, `transformers.X`, `Base`."""
        if isinstance(expr, cst.Subscript):  # Generic[T]-style bases
            return self.resolve_expr(module, expr.value)
        name = dotted(expr)
        if name is None:
            return UNKNOWN
        head, *rest = name.split(".")
        value = self.resolve(module, head)
        for part in rest:
            if value is UNKNOWN or isinstance(value, (ParsedClass, ParsedFunction)):
                return UNKNOWN
            value = getattr(value, part, UNKNOWN)
        return value

    def mro(self, cls) -> list:
        """C3 linearisation over parsed and real classes."""
        if isinstance(cls, type):
            return list(cls.__mro__)
        key = id(cls)
        if key in self._mro:
            return list(self._mro[key])
        bases = self.bases(cls)
        seqs = [list(self.mro(b)) for b in bases] + [list(bases)]
        out = [cls]
        while True:
            seqs = [s for s in seqs if s]
            if not seqs:
                break
            for seq in seqs:
                head = seq[0]
                if not any(head in s[1:] for s in seqs):
                    break
            else:
                raise gap(f"the class hierarchy of {cls.name}", "no consistent method order")
            out.append(head)
            for s in seqs:
                if s[0] is head:
                    del s[0]
        self._mro[key] = out
        return list(out)


def _real(base: str, attr: str | None):
    """`import base` / `from base import attr`, for the library roots only."""
    if not base or base.split(".")[0] not in REAL_ROOTS:
        return UNKNOWN
    try:
        module = importlib.import_module(base)
    except Exception:
        return UNKNOWN
    if attr is None:
        return module
    if hasattr(module, attr):
        return getattr(module, attr)
    try:
        return importlib.import_module(f"{base}.{attr}")
    except Exception:
        return UNKNOWN


_BUILTINS = {
    "int", "float", "bool", "str", "min", "max", "abs", "round", "len", "range", "list", "tuple",
    "dict", "set", "sum", "isinstance", "getattr", "hasattr", "divmod", "pow", "sorted",
    "enumerate", "zip", "any", "all", "reversed", "object", "super", "setattr", "ValueError", "TypeError",
    "NotImplementedError", "KeyError", "AttributeError", "RuntimeError", "print",
}  # fmt: skip


# -- method lookup for the analysis ---------------------------------------------------------------
def defines(klass, method_name: str, code: ParsedCode | None = None) -> bool:
    """Whether `klass` (parsed or real) itself defines `method_name` (a real class's wrapper that
    only re-exposes an inherited method does not count, as SourceIndex.defining_class says)."""
    if isinstance(klass, ParsedClass):
        return method_name in klass.methods
    fn = vars(klass).get(method_name)
    if fn is None:
        return False
    qualname = getattr(fn, "__qualname__", "")
    return not (hasattr(fn, "__wrapped__") and not qualname.startswith(f"{klass.__qualname__}."))


class StaticSourceIndex(SourceIndex):
    """A SourceIndex that also serves the stand-in classes of a static build: their methods are
    looked up along the parsed class hierarchy (`_static_mro`), in the checkpoint's files or, for
    a library base class, in that library's source."""

    def defining_class(self, cls: type, method_name: str):
        mro = getattr(cls, "_static_mro", None)
        if mro is None:
            return super().defining_class(cls, method_name)
        for klass in mro:
            if defines(klass, method_name):
                return klass
        raise InferenceError(f"{cls.__name__}.{method_name}", "no class in the MRO defines it")

    def find_method(self, cls: type, method_name: str):
        if getattr(cls, "_static_mro", None) is None:
            return super().find_method(cls, method_name)
        klass = self.defining_class(cls, method_name)
        if isinstance(klass, ParsedClass):
            parsed = self.parse(str(klass.module.path.resolve()))
            func = parsed.method(klass.name, method_name)
            return parsed, klass.name, func
        return super().find_method(klass, method_name)
