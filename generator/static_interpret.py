"""The interpreter of a static build: one parsed function body at a time (its parameters and
statements; expressions and calls are in static_expressions), never importing or running the
checkpoint's code."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import libcst as cst
import torch
from torch import nn

from .analysis.evaluate import UNKNOWN
from .analysis.source_index import ParsedFile, dotted
from .parsed_source import gap
from .static_expressions import BoundMethod, Expressions, SuperProxy
from .static_standins import (
    MAX_LOOP,
    BreakSignal,
    ContinueSignal,
    InterpretedRaise,
    ReturnSignal,
    StandIn,
    UnknownTensor,
    is_config,
    is_unknown,
    target_names,
    touches_self,
    walk_nodes,
)

if TYPE_CHECKING:
    from .static_build import StaticBuilder

# -- the interpreter ------------------------------------------------------------------------------
_AUGOPS = {
    cst.AddAssign: operator.add, cst.SubtractAssign: operator.sub,
    cst.MultiplyAssign: operator.mul, cst.DivideAssign: operator.truediv,
    cst.FloorDivideAssign: operator.floordiv, cst.ModuloAssign: operator.mod,
    cst.PowerAssign: operator.pow,
}  # fmt: skip


class Frame(Expressions):
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
            raise ReturnSignal(self.ev(small.value) if small.value is not None else None)
        elif isinstance(small, cst.Raise):
            raise InterpretedRaise(self.site(small))
        elif isinstance(small, cst.Assert):
            if self.truth(small.test) is False:
                raise InterpretedRaise(self.site(small))
        elif isinstance(small, cst.Break):
            raise BreakSignal()
        elif isinstance(small, cst.Continue):
            raise ContinueSignal()
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
            elif isinstance(base, nn.Module) and not is_unknown(value):
                setattr(base, name, value)  # `self.norm.bias = None` on a module it built
            elif base is not UNKNOWN and is_config(base) and value is not UNKNOWN:
                setattr(base, name, value)  # the model writes into its config (Falcon does)
            return
        if isinstance(target, cst.Subscript) and len(target.slice) == 1:
            # `self.rope_type[kind] = ...`: a plain container the code keeps
            base = self.ev(target.value)
            elem = target.slice[0].slice
            key = self.ev(elem.value) if isinstance(elem, cst.Index) else UNKNOWN
            if isinstance(base, dict) and not is_unknown(key):
                if is_unknown(value):
                    base.pop(key, None)
                else:
                    base[key] = value
            elif isinstance(base, list) and isinstance(key, int) and not is_unknown(value):
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
        if value is UNKNOWN or isinstance(value, (SuperProxy, BoundMethod)):
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
            except BreakSignal:
                return
            except ContinueSignal:
                continue
        if isinstance(stmt.orelse, cst.Else):
            self.block(stmt.orelse.body.body)

    def undecided(self, bodies, stmt, what: str) -> None:
        """A branch or loop the interpretation cannot decide: harmless when it only computes
        local values (they become unknown), a gap when it builds or sets anything on self."""
        touched = [n for body in bodies for s in body for n in walk_nodes(s) if touches_self(n)]
        if touched:
            raise gap(
                "which modules the model builds",
                f"{what} is not decided by config.json (nor by what the parsed code computes "
                f"from it), and it sets `{self.parsed.code(touched[0], 60)}`",
                self.parsed.where(stmt),
            )
        for body in bodies:
            for s in body:
                for n in walk_nodes(s):
                    if isinstance(n, cst.Return):
                        raise ReturnSignal(UNKNOWN)
                    if isinstance(n, (cst.Assign, cst.AugAssign, cst.AnnAssign, cst.For)):
                        targets = (
                            [t.target for t in n.targets] if isinstance(n, cst.Assign) else
                            [n.target]
                        )  # fmt: skip
                        for t in targets:
                            for name in target_names(t):
                                self.known[name] = UNKNOWN
