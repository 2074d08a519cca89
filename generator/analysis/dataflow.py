"""A small abstract interpreter that turns a `forward` body into a data-flow graph.

Values are graph nodes: the hidden-states input, other forward arguments (context), calls of
child modules (`self.mlp(x)`), operators and function calls, tuple packing and item access, and
phi nodes where an undecidable `if` merges two branches. Nothing is executed: conditions are
decided by an `Evaluator` over the probed instance where possible, and both branches are followed
otherwise. Helper methods of the same class (`self._ff_block(x)`) are inlined, and so is the
forward of a child the caller names (`enter`): its own calls then become calls of its children,
at their dotted paths below the module (`self.norm_attn_norm.attn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import libcst as cst

from ..errors import InferenceError
from .evaluate import UNKNOWN, Evaluator
from .source_index import ParsedFile, dotted, param_names

_MAX_INLINE_DEPTH = 4
# tensor metadata: reading it does not carry the hidden states into the result
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"})
_META_METHODS = frozenset({"size", "dim", "numel", "nelement", "element_size", "get_device"})


@dataclass(eq=False)
class Node:
    inputs: tuple["Node", ...] = ()
    where: str = ""
    code: str = ""


@dataclass(eq=False)
class Input(Node):
    name: str = "hidden_states"


@dataclass(eq=False)
class Param(Node):
    name: str = ""


@dataclass(eq=False)
class Const(Node):
    value: object = UNKNOWN


@dataclass(eq=False)
class Call(Node):
    """A call of a child module of `self` (target is its dotted path below the module)."""

    target: str = ""
    unit: str = ""  # the layer unit called: the child, or a container's child (`a.attn`)
    unpacked: int | None = None  # `a, b = self.x(...)` -> 2
    indexed: bool = False  # `out = self.x(...); out[0]`
    # per input: its positional index, or its keyword (None for *args / **kwargs)
    slots: tuple[int | str | None, ...] = ()
    # set by the segment reader when the child adds the argument at this slot to its output
    residual_slot: int | str | None = None
    residual_param: str | None = None

    def slot_of(self, node: "Node") -> int | str | None:
        """How `node` is passed to the call (first occurrence)."""
        for x, slot in zip(self.inputs, self.slots):
            if x is node:
                return slot
        return None


@dataclass(eq=False)
class Op(Node):
    kind: str = ""
    additive: bool = False


@dataclass(eq=False)
class Phi(Node):
    pass


@dataclass(eq=False)
class Item(Node):
    index: object = None


@dataclass(eq=False)
class Pack(Node):
    pass


def phi(nodes: list[Node], where: str = "") -> Node:
    unique: list[Node] = []
    for n in nodes:
        if all(n is not u for u in unique):
            unique.append(n)
    return unique[0] if len(unique) == 1 else Phi(inputs=tuple(unique), where=where)


class _Return(Exception):
    pass


@dataclass
class FlowGraph:
    """Result of interpreting one forward: its input, all nodes, and the returned value."""

    input: Input
    calls: list[Call]
    returned: Node | None
    returns_tuple: bool
    _anc: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)
    _ctx: dict[int, bool] = field(default_factory=dict, repr=False)

    def ancestors(self, node: Node) -> frozenset[int]:
        """ids of every node `node` depends on (not itself)."""
        key = id(node)
        if key not in self._anc:
            acc: set[int] = set()
            for x in node.inputs:
                acc.add(id(x))
                acc |= self.ancestors(x)
            self._anc[key] = frozenset(acc)
        return self._anc[key]

    def derived(self, node: Node) -> bool:
        """Whether `node` carries the hidden states (depends on the input)."""
        return node is self.input or id(self.input) in self.ancestors(node)

    def depends_on_context(self, node: Node) -> bool:
        """Whether `node` depends on a forward argument other than the hidden states."""
        key = id(node)
        if key not in self._ctx:
            self._ctx[key] = isinstance(node, Param) or any(
                self.depends_on_context(x) for x in node.inputs
            )
        return self._ctx[key]


@dataclass(frozen=True)
class Scope:
    """A child module whose forward is read in place of a call of it: the module, its forward,
    and the `is_child` / `method_source` answers for `self` bound to it."""

    instance: object
    parsed: ParsedFile
    func: cst.FunctionDef
    is_child: Callable[[str], bool]
    method_source: Callable[[str], tuple[ParsedFile, cst.FunctionDef] | None]


class FlowInterpreter:
    """Interprets `func` of class `class_name` in `parsed`, with `self` bound to `instance`.

    `is_child(path)` says whether `self.<path>` is a child module (a call of it becomes a Call
    node); `method_source(name)` returns (ParsedFile, FunctionDef) for a helper method to inline;
    `enter(path)` returns the Scope of a child (its dotted path below the module) whose forward
    is read in place of its call, or None.
    """

    def __init__(
        self,
        parsed: ParsedFile,
        instance: object,
        is_child: Callable[[str], bool],
        method_source: Callable[[str], tuple[ParsedFile, cst.FunctionDef] | None],
        enter: Callable[[str], Scope | None] | None = None,
    ):
        self.parsed = parsed
        self.instance = instance
        self.is_child = is_child
        self.method_source = method_source
        self.enter = enter
        self.calls: list[Call] = []
        self.returns: list[Node] = []
        self._depth = 0
        self._prefix = ""  # the dotted path of the child whose forward is being read

    # -- entry point -------------------------------------------------------------------------
    def run(self, func: cst.FunctionDef, input_param: str | None = None) -> FlowGraph:
        """Interpret `func`; its first parameter after self is the input, or `input_param`."""
        names = param_names(func)
        if len(names) < 2 or names[0] != "self":
            raise InferenceError(
                f"data flow of {func.name.value}", "expected a method taking the hidden states"
            )
        name = input_param or names[1]
        if name not in names[1:]:
            raise InferenceError(f"data flow of {func.name.value}", f"no parameter {name!r}")
        inp = Input(name=name, where=self.parsed.where(func))
        env, known = self._bind_params(func, [], {name: inp})
        returned, returns_tuple = self._run_body(func, env, known)
        return FlowGraph(inp, self.calls, returned, returns_tuple)

    # -- functions ---------------------------------------------------------------------------
    def _bind_params(self, func, args, kwargs):
        p = func.params
        env: dict[str, Node] = {}
        known: dict[str, object] = {}
        positional = [x for x in (*p.posonly_params, *p.params)][1:]  # drop self
        for i, param in enumerate(positional):
            name = param.name.value
            if i < len(args):
                env[name] = args[i]
            elif name in kwargs:
                env[name] = kwargs.pop(name)
            else:
                env[name] = Param(name=name)
                if self._defaults_to_none(param):
                    known[name] = None  # optional inputs a decoder-only model leaves unset
        for param in p.kwonly_params:
            name = param.name.value
            if name in kwargs:
                env[name] = kwargs.pop(name)
            else:
                env[name] = Param(name=name)
                if self._defaults_to_none(param):
                    known[name] = None
        if isinstance(p.star_kwarg, cst.Param):
            env[p.star_kwarg.name.value] = Param(name=p.star_kwarg.name.value)
        if isinstance(p.star_arg, cst.Param):
            env[p.star_arg.name.value] = Param(name=p.star_arg.name.value)
        return env, known

    @staticmethod
    def _defaults_to_none(param: cst.Param) -> bool:
        """Context arguments stay graph inputs (they make a call token-mixing), but a branch on
        an argument that defaults to None is decided as if the caller left it unset."""
        return isinstance(param.default, cst.Name) and param.default.value == "None"

    def _run_body(self, func, env, known):
        returns: list[Node] = []
        tuple_flags: list[bool] = []
        state = _State(env, known, returns, tuple_flags)
        try:
            self._block(func.body.body, state)
        except _Return:
            pass
        self.returns = list(returns)  # every value the body returns, tuples whole
        if not returns:
            return None, False
        firsts = [self._first(r) for r in returns]
        return phi(firsts), any(tuple_flags)

    def _is_tuple(self, node: Node) -> bool:
        """A tuple literal, a tuple grown with `+=`/`+`, or a phi of those."""
        if isinstance(node, Pack):
            return True
        if isinstance(node, Op) and node.additive and node.inputs:
            return self._is_tuple(node.inputs[0])
        if isinstance(node, Phi):
            return all(self._is_tuple(x) for x in node.inputs)
        return False

    def _first(self, node: Node) -> Node:
        """Element 0 of a returned value (the hidden states of a layer returning a tuple)."""
        if isinstance(node, Pack):
            return node.inputs[0]
        if isinstance(node, Op) and self._is_tuple(node):
            return self._first(node.inputs[0])
        if isinstance(node, Phi) and self._is_tuple(node):
            return phi([self._first(x) for x in node.inputs])
        return node

    # -- statements --------------------------------------------------------------------------
    def _block(self, stmts, state: "_State") -> None:
        for stmt in stmts:
            if state.dead:
                return
            self._stmt(stmt, state)

    def _stmt(self, stmt, state: "_State") -> None:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if state.dead:
                    return
                self._small(small, state)
        elif isinstance(stmt, cst.If):
            self._if(stmt, state)
        elif isinstance(stmt, (cst.With, cst.For, cst.While)):
            # loops are read once: enough to see which modules a layer calls and how
            self._block(stmt.body.body, state)
        elif isinstance(stmt, cst.Try):
            self._block(stmt.body.body, state)
        # function and class definitions inside forward carry no data flow we follow

    def _small(self, small, state: "_State") -> None:
        ev = Evaluator(self.instance, state.known)
        if isinstance(small, cst.Assign):
            value = self._expr(small.value, state)
            for target in small.targets:
                self._bind(target.target, value, state, ev)
        elif isinstance(small, cst.AnnAssign) and small.value is not None:
            self._bind(small.target, self._expr(small.value, state), state, ev)
        elif isinstance(small, cst.AugAssign):
            if isinstance(small.target, cst.Name):
                left = state.env.get(small.target.value, Const())
                right = self._expr(small.value, state)
                additive = isinstance(small.operator, cst.AddAssign)
                state.env[small.target.value] = Op(
                    inputs=(left, right),
                    kind="+=" if additive else "augop",
                    additive=additive,
                    where=self.parsed.where(small),
                    code=self.parsed.code(small),
                )
        elif isinstance(small, cst.Expr):
            self._expr(small.value, state)
        elif isinstance(small, cst.Return):
            if small.value is not None:
                value = self._expr(small.value, state)
                state.returns.append(value)
                state.tuple_flags.append(self._is_tuple(value))
            state.dead = True
        elif isinstance(small, cst.Raise):
            state.dead = True

    def _bind(self, target, value: Node, state: "_State", ev: Evaluator) -> None:
        if isinstance(target, cst.Name):
            state.env[target.value] = value
            if isinstance(value, Const):
                state.known[target.value] = value.value
            else:
                state.known.pop(target.value, None)
        elif isinstance(target, (cst.Tuple, cst.List)):
            elements = target.elements
            starred = any(isinstance(e, cst.StarredElement) for e in elements)
            if isinstance(value, Call) and not starred:
                value.unpacked = len(elements)
            for i, element in enumerate(elements):
                if isinstance(element, cst.StarredElement):
                    continue
                if isinstance(value, Pack) and not starred and len(value.inputs) == len(elements):
                    part = value.inputs[i]
                else:
                    part = Item(inputs=(value,), index=i, where=value.where)
                self._bind(element.value, part, state, ev)

    def _if(self, stmt: cst.If, state: "_State") -> None:
        decided = Evaluator(self.instance, state.known).truth(stmt.test)
        self._expr(stmt.test, state)  # calls inside a condition still run
        orelse = stmt.orelse
        else_body = []
        if isinstance(orelse, cst.Else):
            else_body = orelse.body.body
        elif isinstance(orelse, cst.If):
            else_body = [orelse]
        if decided is True:
            self._block(stmt.body.body, state)
            return
        if decided is False:
            self._block(else_body, state)
            return
        a, b = state.fork(), state.fork()
        self._block(stmt.body.body, a)
        self._block(else_body, b)
        state.merge(a, b, self.parsed.where(stmt))

    # -- expressions -------------------------------------------------------------------------
    def _expr(self, node: cst.BaseExpression, state: "_State") -> Node:
        where = self.parsed.where(node)
        if isinstance(node, cst.Name):
            if node.value in state.env:
                return state.env[node.value]
            return Const(value=Evaluator(self.instance, state.known).value(node))
        if isinstance(node, (cst.Integer, cst.Float, cst.SimpleString, cst.ConcatenatedString)):
            return Const(value=Evaluator(self.instance).value(node))
        if isinstance(node, cst.Call):
            return self._call(node, state)
        if isinstance(node, cst.BinaryOperation):
            left = self._expr(node.left, state)
            right = self._expr(node.right, state)
            additive = isinstance(node.operator, cst.Add)
            return Op(
                inputs=(left, right),
                kind=type(node.operator).__name__,
                additive=additive,
                where=where,
                code=self.parsed.code(node),
            )
        if isinstance(node, cst.UnaryOperation):
            return Op(inputs=(self._expr(node.expression, state),), kind="unary", where=where)
        if isinstance(node, (cst.Tuple, cst.List)):
            items = tuple(self._expr(e.value, state) for e in node.elements)
            return Pack(inputs=items, where=where)
        if isinstance(node, cst.Subscript):
            base = self._expr(node.value, state)
            index = None
            if len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
                idx = node.slice[0].slice.value
                index = Evaluator(self.instance, state.known).value(idx)
                self._expr(idx, state)
            if isinstance(base, Call):
                base.indexed = True
            if (
                isinstance(base, Pack)
                and isinstance(index, int)
                and -len(base.inputs) <= index < len(base.inputs)
            ):
                return base.inputs[index]
            return Item(inputs=(base,), index=index, where=where)
        if isinstance(node, cst.Attribute) and node.attr.value in _META_ATTRS:
            return Const()
        if isinstance(node, cst.Attribute):
            value = Evaluator(self.instance, state.known).value(node)
            if value is not UNKNOWN or dotted(node) and dotted(node).startswith("self."):
                return Const(value=value)
            return Item(inputs=(self._expr(node.value, state),), index=node.attr.value, where=where)
        if isinstance(node, cst.IfExp):
            decided = Evaluator(self.instance, state.known).truth(node.test)
            if decided is True:
                return self._expr(node.body, state)
            if decided is False:
                return self._expr(node.orelse, state)
            return phi([self._expr(node.body, state), self._expr(node.orelse, state)], where)
        if isinstance(node, (cst.BooleanOperation, cst.Comparison)):
            return Const(value=Evaluator(self.instance, state.known).value(node))
        return Const()

    def _call_args(self, node: cst.Call, state: "_State"):
        args: list[Node] = []
        kwargs: dict[str, Node] = {}
        extra: list[Node] = []
        for arg in node.args:
            value = self._expr(arg.value, state)
            if arg.star == "**" or arg.star == "*":
                extra.append(value)
            elif arg.keyword is not None:
                kwargs[arg.keyword.value] = value
            else:
                args.append(value)
        return args, kwargs, extra

    def _call(self, node: cst.Call, state: "_State") -> Node:
        where = self.parsed.where(node)
        name = dotted(node.func)
        if isinstance(node.func, cst.Attribute) and node.func.attr.value in _META_METHODS:
            return Const()
        args, kwargs, extra = self._call_args(node, state)
        all_inputs = tuple(args) + tuple(kwargs.values()) + tuple(extra)
        if name is not None and name.startswith("self.") and name.count(".") >= 1:
            path = name[len("self.") :]
            scope = self.enter(self._prefix + path) if self.enter and self.is_child(path) else None
            if scope is not None and self._depth < _MAX_INLINE_DEPTH:
                return self._enter(scope, self._prefix + path + ".", args, dict(kwargs))
            if self.is_child(path):
                slots = (*range(len(args)), *kwargs, *([None] * len(extra)))
                call = Call(
                    inputs=all_inputs,
                    target=self._prefix + path,
                    unit=self._prefix + path.split(".")[0],
                    where=where,
                    code=self.parsed.code(node),
                    slots=slots,
                )
                self.calls.append(call)
                return call
            method = self.method_source(path) if "." not in path else None
            if method is not None and self._depth < _MAX_INLINE_DEPTH:
                return self._inline(method, args, dict(kwargs))
        if isinstance(node.func, cst.Attribute) and name is None:
            receiver = self._expr(node.func.value, state)
            all_inputs = (receiver,) + all_inputs
        elif isinstance(node.func, cst.Attribute) and name is not None:
            head = name.split(".")[0]
            if head in state.env:  # a method of a local value: x.view(...), x.to(...)
                all_inputs = (state.env[head],) + all_inputs
        kind = name.rsplit(".", 1)[-1] if name else "call"
        return Op(
            inputs=all_inputs,
            kind=kind,
            additive=kind in ("add", "dropout_add") or kind.endswith("_add"),
            where=where,
            code=self.parsed.code(node),
        )

    def _inline(self, method: tuple[ParsedFile, cst.FunctionDef], args, kwargs) -> Node:
        parsed, func = method
        saved = self.parsed
        self.parsed = parsed
        self._depth += 1
        try:
            env, known = self._bind_params(func, args, kwargs)
            returns: list[Node] = []
            flags: list[bool] = []
            state = _State(env, known, returns, flags)
            self._block(func.body.body, state)
            if not returns:
                return Const()
            return phi(returns)
        finally:
            self._depth -= 1
            self.parsed = saved

    def _enter(self, scope: Scope, prefix: str, args, kwargs) -> Node:
        """Read a child's forward in place of its call, `self` bound to the child."""
        saved = (self.instance, self.is_child, self.method_source, self._prefix)
        self.instance, self.is_child = scope.instance, scope.is_child
        self.method_source, self._prefix = scope.method_source, prefix
        try:
            return self._inline((scope.parsed, scope.func), args, kwargs)
        finally:
            self.instance, self.is_child, self.method_source, self._prefix = saved


@dataclass
class _State:
    env: dict[str, Node]
    known: dict[str, object]
    returns: list[Node]
    tuple_flags: list[bool]
    dead: bool = False

    def fork(self) -> "_State":
        return _State(dict(self.env), dict(self.known), self.returns, self.tuple_flags, self.dead)

    def merge(self, a: "_State", b: "_State", where: str) -> None:
        live = [s for s in (a, b) if not s.dead]
        if not live:
            self.dead = True
            return
        if len(live) == 1:
            self.env, self.known = live[0].env, live[0].known
            return
        names = set(a.env) | set(b.env)
        self.env = {n: phi([s.env[n] for s in live if n in s.env], where) for n in sorted(names)}
        self.known = {k: v for k, v in a.known.items() if k in b.known and b.known[k] is v}
