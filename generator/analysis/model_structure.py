"""Static facts about the model around the decoder layers, read from `__init__` and `forward`.

- layer stacks: `self.layers = nn.ModuleList([XDecoderLayer(config, i) for i in range(...)])`;
- the model loop: which stack `forward` iterates, what the loop does with a layer's output
  (`hidden_states = layer(...)` a tensor, `outputs = layer(...); outputs[0]` a tuple,
  `hidden_states, weights = layer(...)` a tuple of two), which
  attributes of the layer it reads (`decoder_layer.attention_type`);
- the final norm: the child called on the loop's hidden states after the loop;
- the modules called before the loop (input and position embeddings);
- how a child is constructed (`self.rotary_emb = LlamaRotaryEmbedding(config=config)`);
- the `config.X` fields an `__init__` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from ..errors import InferenceError
from .source_index import ParsedFile, SourceIndex, dotted, param_names


@dataclass(frozen=True)
class StackFinding:
    attr: str  # attribute of the owner holding the ModuleList
    element_classes: tuple[str, ...]  # class names built in the list (empty when dispatched)
    count: str  # source of the length expression, e.g. "config.num_hidden_layers"
    where: str
    code: str


@dataclass
class LoopFinding:
    stack_attr: str
    loop_var: str
    returns_tuple: bool
    layer_attributes: list[str]  # attributes of the layer the loop reads
    hidden_var: str
    final_norm: str | None  # child of the owner called on the hidden states after the loop
    final_norm_at: str | None
    before_loop: list[str]  # children of the owner called before the loop
    evidence: list[str] = field(default_factory=list)
    after_loop: list[str] = field(default_factory=list)  # others called after it (project_out)
    # values the loop unpacks from a layer's output (`hidden_states, topk = layer(...)`: 2);
    # a dummy block returns that many, the hidden states and Nones
    tuple_size: int = 1


@dataclass(frozen=True)
class Construction:
    """`self.<attr> = <callee>(<args>)` in an `__init__`."""

    callee: str
    args: tuple[tuple[str | None, cst.BaseExpression], ...]  # (keyword or None, expression)
    init_params: tuple[str, ...]  # the __init__'s parameter names (self first)
    where: str
    code: str


_MODULE_LIST = m.Call(func=m.Name("ModuleList") | m.Attribute(attr=m.Name("ModuleList")))


def _init_assignments(parsed: ParsedFile, func: cst.FunctionDef):
    """Yield (attr, value, statement) for every `self.attr = value` in `func`, nested blocks too."""
    for node in _walk(func.body):
        if isinstance(node, cst.Assign):
            for t in node.targets:
                name = dotted(t.target)
                if name and name.startswith("self.") and name.count(".") == 1:
                    yield name[5:], node.value, node
        elif isinstance(node, cst.AnnAssign) and node.value is not None:
            name = dotted(node.target)
            if name and name.startswith("self.") and name.count(".") == 1:
                yield name[5:], node.value, node


def _walk(node: cst.CSTNode):
    """Pre-order walk that does not enter nested function or class definitions."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, (cst.FunctionDef, cst.ClassDef, cst.Lambda)) and n is not node:
            continue
        stack.extend(reversed(list(n.children)))


def find_stacks(index: SourceIndex, cls: type) -> list[StackFinding]:
    """ModuleLists of modules built in `cls.__init__` (empty when __init__ builds none), also
    through a method of its own that returns one (`self.layers = self.get_layers()`, Zamba2)."""
    parsed, _, init = index.find_method(cls, "__init__")
    found = []
    for attr, value, stmt in _init_assignments(parsed, init):
        src, where, code = parsed, parsed.where(stmt), parsed.code(stmt)
        returned = _returned_module_list(index, cls, value)
        if returned is not None:
            src, value, at = returned
            where, code = at, f"{code} returns `{src.code(value, 60)}`"
        if not m.matches(value, _MODULE_LIST) or not value.args:
            continue
        inner = value.args[0].value
        classes: tuple[str, ...] = ()
        count = ""
        if isinstance(inner, (cst.ListComp, cst.GeneratorExp)):
            elt = inner.elt
            if isinstance(elt, cst.Call) and isinstance(elt.func, cst.Name):
                classes = (elt.func.value,)
            count = src.code(inner.for_in.iter)
        found.append(StackFinding(attr, classes, count, where, code))
    return found


def _returned_module_list(index: SourceIndex, cls: type, value: cst.BaseExpression):
    """For `self.<method>()` with no arguments: (the method's file, the `ModuleList(...)` it
    returns, where), when its only return is one; else None."""
    call = value
    if not (
        isinstance(call, cst.Call)
        and not call.args
        and isinstance(call.func, cst.Attribute)
        and m.matches(call.func.value, m.Name("self"))
    ):
        return None
    try:
        parsed, _, method = index.find_method(cls, call.func.attr.value)
    except InferenceError:
        return None
    returns = [n for n in _walk(method.body) if isinstance(n, cst.Return)]
    if len(returns) != 1 or returns[0].value is None:
        return None
    if not m.matches(returns[0].value, _MODULE_LIST):
        return None
    return parsed, returns[0].value, parsed.where(returns[0])


def find_construction(index: SourceIndex, cls: type, attr: str) -> Construction | None:
    """How `cls.__init__` builds `self.<attr>` (the last plain call assigned to it)."""
    parsed, _, init = index.find_method(cls, "__init__")
    found = None
    for name, value, stmt in _init_assignments(parsed, init):
        if name == attr and isinstance(value, cst.Call) and dotted(value.func):
            args = tuple(
                (a.keyword.value if a.keyword else None, a.value) for a in value.args if not a.star
            )
            if any(a.star for a in value.args):
                return None
            found = Construction(
                dotted(value.func),
                args,
                tuple(param_names(init)),
                parsed.where(stmt),
                parsed.code(stmt),
            )
    return found


def config_reads(index: SourceIndex, cls: type) -> list[tuple[str, str]]:
    """(field, where) for each `config.X`, `self.config.X` or `getattr(config, "X")` read in
    `cls.__init__`, where `config` is any parameter whose name contains "config", or a local
    holding one layer's view of it (`layer_config = config.per_layer_config[layer_idx]`:
    transformers' heterogeneous configs; Gemma 4 unified reads its KV heads there)."""
    try:
        parsed, _, init = index.find_method(cls, "__init__")
    except InferenceError:
        return []
    config_names = {n for n in param_names(init) if "config" in n}
    for node in _walk(init.body):
        if (
            isinstance(node, cst.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0].target, cst.Name)
            and isinstance(node.value, cst.Subscript)
            and isinstance(node.value.value, cst.Attribute)
            and node.value.value.attr.value == "per_layer_config"
            and dotted(node.value.value.value) in config_names | {"self.config"}
        ):
            config_names.add(node.targets[0].target.value)
    reads: list[tuple[str, str]] = []
    for node in _walk(init.body):
        if isinstance(node, cst.Attribute):
            base = dotted(node.value)
            if base in config_names or base == "self.config":
                reads.append((node.attr.value, parsed.where(node)))
        elif m.matches(node, m.Call(func=m.Name("getattr"))) and len(node.args) >= 2:
            base = dotted(node.args[0].value)
            key = node.args[1].value
            if (base in config_names or base == "self.config") and isinstance(
                key, cst.SimpleString
            ):
                reads.append((key.evaluated_value, parsed.where(node)))
    return reads


def optional_modules(index: SourceIndex, cls: type, instance: object) -> dict[str, str]:
    """Modules `cls.__init__` builds under a condition the probed `instance` did not take
    (`self.project_in = nn.Linear(...)` when `word_embed_proj_dim != hidden_size`, else None):
    attr -> where it is built. Other configs of the model type have them."""
    try:
        parsed, _, init = index.find_method(cls, "__init__")
    except InferenceError:
        return {}
    found: dict[str, str] = {}
    for attr, value, stmt in _init_assignments(parsed, init):
        if not isinstance(value, cst.Call) or m.matches(value, _MODULE_LIST):
            continue
        callee = dotted(value.func) or ""
        if not callee.rpartition(".")[2][:1].isupper():
            continue  # a class instantiation (a module), not a helper function call
        if getattr(instance, attr, None) is None:
            found.setdefault(attr, f"{parsed.where(stmt)} `{parsed.code(stmt)}`")
    return found


def analyze_loop(
    index: SourceIndex,
    cls: type,
    stack_attr: str,
    children: set[str],
    optional: frozenset[str] = frozenset(),
) -> LoopFinding:
    """Read `cls.forward`: the loop over `self.<stack_attr>` and what surrounds it.
    `optional` names modules other configs add; calls of them count as calls of children, but
    the final norm is always a module the probed instance has."""
    parsed, _, func = index.find_method(cls, "forward")
    fact = f"the layer loop of {cls.__name__}.forward ({parsed.where(func)})"
    body = list(func.body.body)
    loop, position = _find_loop(body, stack_attr)
    if loop is None:
        raise InferenceError(fact, f"no `for` loop over self.{stack_attr}")
    loop_var, evidence = _loop_var(loop, stack_attr, parsed)
    if loop_var is None:
        raise InferenceError(fact, "cannot tell the loop variable", [parsed.where(loop)])

    returns_tuple = False
    tuple_size = 1
    hidden_var = None
    attributes: list[str] = []
    call_targets: list[str] = []
    for node in _walk(loop.body):
        if isinstance(node, cst.Assign) and m.matches(node.value, m.Call(func=m.Name(loop_var))):
            call = node.value
            if call.args and isinstance(call.args[0].value, cst.Name) and not call.args[0].keyword:
                hidden_var = call.args[0].value.value
            for t in node.targets:
                if isinstance(t.target, (cst.Tuple, cst.List)):
                    returns_tuple = True
                    # a starred target takes what is left, even nothing
                    plain = [e for e in t.target.elements if not isinstance(e, cst.StarredElement)]
                    tuple_size = max(tuple_size, len(plain))
                elif isinstance(t.target, cst.Name):
                    call_targets.append(t.target.value)
            evidence.append(f"{parsed.where(node)} `{parsed.code(node)}`")
        if isinstance(node, cst.Attribute) and m.matches(node.value, m.Name(loop_var)):
            attributes.append(node.attr.value)
    for node in _walk(loop.body):
        if isinstance(node, cst.Subscript) and isinstance(node.value, cst.Name):
            if node.value.value in call_targets:
                returns_tuple = True
                evidence.append(f"{parsed.where(node)} `{parsed.code(node)}` indexes the output")
    if hidden_var is None:
        for node in _walk(loop.body):
            if m.matches(node, m.Call(func=m.Name(loop_var))):
                for a in node.args:
                    if (
                        a.keyword
                        and a.keyword.value == "hidden_states"
                        and isinstance(a.value, cst.Name)
                    ):
                        hidden_var = a.value.value
    if hidden_var is None:
        raise InferenceError(
            fact, "cannot tell which variable carries the hidden states", [parsed.where(loop)]
        )

    known = set(children) | set(optional)
    final_norm = final_norm_at = None
    for stmt in body[position + 1 :]:
        call = next(
            (
                (child, node)
                for child, node in _child_calls(stmt, children)
                if node.args and _feeds(node.args[0].value, hidden_var, children)
            ),
            None,
        )
        if call is not None:
            final_norm, node = call
            final_norm_at = parsed.where(node)
            evidence.append(f"{final_norm_at} `{parsed.code(stmt)}` after the loop")
            break

    before = list(
        dict.fromkeys(
            child
            for stmt in body[:position]
            for child in _calls_through_methods(index, cls, stmt, known)
        )
    )
    after = list(
        dict.fromkeys(
            child
            for stmt in body[position + 1 :]
            for child, node in _child_calls(stmt, known)
            if child != final_norm
            and node.args
            and m.matches(node.args[0].value, m.Name(hidden_var))
        )
    )
    return LoopFinding(
        stack_attr=stack_attr,
        loop_var=loop_var,
        returns_tuple=returns_tuple,
        tuple_size=tuple_size,
        layer_attributes=sorted(set(a for a in attributes if a not in ("forward", "__call__"))),
        hidden_var=hidden_var,
        final_norm=final_norm,
        final_norm_at=final_norm_at,
        before_loop=before,
        evidence=evidence,
        after_loop=after,
    )


def _feeds(expr: cst.BaseExpression, var: str, children: set[str]) -> bool:
    """`var` itself, or a call of a child on it (`self.hc_head(hidden_states)`): the final norm
    is the outermost child called on the hidden states after the loop (HY-V4's
    `self.norm(self.hc_head(hidden_states))`), the inner ones run before it."""
    if m.matches(expr, m.Name(var)):
        return True
    if isinstance(expr, cst.Call) and expr.args:
        name = dotted(expr.func)
        if name and name.startswith("self.") and name[5:] in children:
            return _feeds(expr.args[0].value, var, children)
    return False


def _child_calls(stmt: cst.CSTNode, children: set[str]):
    """(child, Call) for every `self.<child>(...)` call in `stmt`, in source order."""
    for node in _walk(stmt):
        if isinstance(node, cst.Call):
            name = dotted(node.func)
            if name and name.startswith("self.") and name[5:] in children:
                yield name[5:], node


def _calls_through_methods(index: SourceIndex, cls: type, stmt, children: set[str], depth=0):
    """The children `stmt` calls, directly or in a method of the same class that it calls
    (Gemma 4's `self.get_per_layer_inputs(input_ids)` looks up `self.embed_tokens_per_layer`
    before the loop), in source order; methods are followed a few levels deep."""
    for node in _walk(stmt):
        if not isinstance(node, cst.Call):
            continue
        name = dotted(node.func)
        if not name or not name.startswith("self.") or "." in name[5:]:
            continue
        if name[5:] in children:
            yield name[5:]
        elif depth < 3 and callable(getattr(cls, name[5:], None)):
            try:
                _, _, func = index.find_method(cls, name[5:])
            except InferenceError:
                continue
            for inner in func.body.body:
                yield from _calls_through_methods(index, cls, inner, children, depth + 1)


def _mentions_stack(node: cst.CSTNode, stack_attr: str) -> bool:
    return any(
        dotted(n) == f"self.{stack_attr}" for n in _walk(node) if isinstance(n, cst.Attribute)
    )


def _find_loop(body, stack_attr):
    """The first top-level statement holding a `for` over the stack, and its position."""
    for i, stmt in enumerate(body):
        for node in _walk(stmt):
            if isinstance(node, cst.For) and _mentions_stack(node.iter, stack_attr):
                return node, i
    return None, -1


def _loop_var(loop: cst.For, stack_attr: str, parsed: ParsedFile):
    """The name bound to a layer: `for layer in self.h`, `for i, layer in enumerate(self.h)`,
    `for layer, x in zip(self.h, ...)`."""
    evidence = [
        f"{parsed.where(loop)} `for {parsed.code(loop.target)} in {parsed.code(loop.iter)}`"
    ]
    target, it = loop.target, loop.iter
    if isinstance(target, cst.Name):
        return target.value, evidence
    if not isinstance(target, (cst.Tuple, cst.List)) or not isinstance(it, cst.Call):
        return None, evidence
    fname = dotted(it.func)
    elements = [e.value for e in target.elements]
    if fname == "enumerate" and len(elements) == 2:
        inner_target, inner_iter = elements[1], it.args[0].value
        if isinstance(inner_target, cst.Name):
            return inner_target.value, evidence
        if isinstance(inner_target, (cst.Tuple, cst.List)) and isinstance(inner_iter, cst.Call):
            elements, it, fname = (
                [e.value for e in inner_target.elements],
                inner_iter,
                dotted(inner_iter.func),
            )
    if fname == "zip":
        for element, arg in zip(elements, it.args):
            if _mentions_stack(arg.value, stack_attr) and isinstance(element, cst.Name):
                return element.value, evidence
    return None, evidence
