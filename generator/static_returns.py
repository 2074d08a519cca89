"""What a module's forward returns (a tuple's length, or a single tensor), read from its parsed
source: the static stand-in for the traced forward of a tiny model; and which places of that
tuple hold one of its own arguments unchanged (`carried_arguments`: a recurrent state passed in,
updated in place, and handed back, RWKV's `return out, state`)."""

from __future__ import annotations


from torch import nn

from .analysis.dataflow import Call, FlowInterpreter, Input, Item, Op, Pack, Param, Phi, _State
from .analysis.source_index import param_names
from .errors import InferenceError

UNSET = object()
_TENSOR_OPS = {
    "Add", "Subtract", "Multiply", "Divide", "FloorDivide", "Power", "MatrixMultiply", "unary",
    "view", "reshape", "to", "transpose", "contiguous", "permute", "type_as", "float", "half",
    "squeeze", "unsqueeze", "flatten", "mul", "add", "sub", "div", "matmul", "clamp", "expand",
    "repeat", "masked_fill", "dropout", "softmax", "silu", "gelu", "relu", "tanh", "sigmoid",
    "narrow", "chunk_item", "rsqrt", "mean", "pow", "sum",
}  # fmt: skip
_TORCH_TUPLES = {"MultiheadAttention": 2, "LSTM": 2, "GRU": 2, "RNN": 2}


class _Returns(FlowInterpreter):
    """A FlowInterpreter that keeps every value a forward returns."""

    def _run_body(self, func, env, known):
        self.raw_returns: list = []
        # the forward's own arguments besides the hidden states: node id -> parameter name
        self.params = {id(v): k for k, v in env.items() if isinstance(v, Param)}
        returns: list = []
        state = _State(env, known, returns, [])
        try:
            self._block(func.body.body, state)
        except Exception:  # noqa: BLE001 - a ReturnSignal of the interpreter, or a body it stops on
            pass
        self.raw_returns = list(returns)
        return (returns[0] if returns else None), False


def returned_size(module: nn.Module, index, depth: int = 0):
    """What `module`'s forward returns, from its source: a tuple size, None for a tensor, or
    UNSET when the returns do not say."""
    cls = type(module)
    if cls.__module__.startswith("torch."):
        return _TORCH_TUPLES.get(cls.__name__)
    if depth > 3:
        return UNSET
    try:
        parsed, _, func = index.find_method(cls, "forward")
    except InferenceError:
        return UNSET
    children = {n for n, _ in module.named_children()}
    interp = _Returns(
        parsed,
        module,
        lambda path: path.split(".")[0] in children,
        lambda name: None,
    )
    try:
        interp.run(func)
    except InferenceError:
        return UNSET
    sizes = {_size(r, module, index, depth) for r in interp.raw_returns}
    if len(sizes) != 1:
        return UNSET
    return sizes.pop()


def _size(node, module, index, depth):
    if isinstance(node, Pack):
        return len(node.inputs)
    if isinstance(node, Phi):
        sizes = {_size(x, module, index, depth) for x in node.inputs}
        return sizes.pop() if len(sizes) == 1 else UNSET
    if isinstance(node, Input):
        return None
    if isinstance(node, Call):
        child = module
        for part in node.target.split("."):
            child = getattr(child, part, None)
        if isinstance(child, nn.Module):
            return returned_size(child, index, depth + 1)
        return UNSET
    if isinstance(node, Op) and not node.additive and node.kind in _TENSOR_OPS:
        return None
    if isinstance(node, Op) and node.additive and node.kind == "Add":
        sizes = [_size(x, module, index, depth) for x in node.inputs]
        if all(s is None for s in sizes):
            return None
    return UNSET


# -- arguments a forward hands back ---------------------------------------------------------------
_MAX_ALTERNATIVES = 16


def carried_arguments(module: nn.Module, index, depth: int = 0) -> dict[int, tuple[str, int]]:
    """The places (after the first) of the tuple `module`'s forward returns that hold one of its
    own arguments unchanged, on every path through the forward: place -> (parameter name, its
    position among the forward's arguments after self). A value a child returns counts when that
    child hands back, at that place, the argument it was given (RWKV's block returns the
    `state` its channel mix returned, which is the one its time mix returned, which is the
    block's own argument). A no-op stand-in of such a module hands that argument back too: the
    caller threads it on (`attention, state = self.attention(x, state=state)`)."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or depth > 3:
        return {}
    try:
        parsed, _, func = index.find_method(cls, "forward")
    except InferenceError:
        return {}
    children = {n for n, _ in module.named_children()}

    def method_source(name: str):
        if name in children or not callable(getattr(cls, name, None)):
            return None
        try:
            p, _, f = index.find_method(cls, name)
        except InferenceError:
            return None
        return p, f

    interp = _Returns(parsed, module, lambda path: path.split(".")[0] in children, method_source)
    try:
        interp.run(func)
    except InferenceError:
        return {}
    positions = {name: i for i, name in enumerate(param_names(func)[1:])}
    found: dict[int, str] | None = None
    for returned in interp.raw_returns:
        alternatives = _alternatives(returned)
        if not alternatives:  # a path that returns no tuple hands nothing back
            return {}
        for elements in alternatives:
            here = {
                i: name
                for i, e in enumerate(elements)
                if i > 0 and (name := _argument(e, interp.params, module, index, depth))
            }
            found = here if found is None else {i: n for i, n in found.items() if here.get(i) == n}
    return {i: (name, positions[name]) for i, name in (found or {}).items() if name in positions}


def _alternatives(node) -> list[list]:
    """The element lists a returned tuple may have: a tuple literal, one grown with `+=` / `+`,
    or a branch merge of those; [] when the value is not a tuple."""
    if isinstance(node, Pack):
        return [list(node.inputs)]
    if isinstance(node, Phi):
        out = [a for x in node.inputs for a in _alternatives(x)]
        return (
            out
            if len(out) <= _MAX_ALTERNATIVES and all(_alternatives(x) for x in node.inputs)
            else []
        )
    if (
        isinstance(node, Op)
        and node.additive
        and node.kind in ("Add", "+=")
        and len(node.inputs) == 2
    ):
        left, right = (_alternatives(x) for x in node.inputs)
        out = [a + b for a in left for b in right]
        return out if len(out) <= _MAX_ALTERNATIVES else []
    return []


def _argument(node, params: dict[int, str], module: nn.Module, index, depth: int) -> str | None:
    """The name of the forward argument `node` is, unchanged: the argument itself, or a place of
    a child's returned tuple where the child hands back what it was passed (followed to what
    the call passed there)."""
    for _ in range(8):
        if id(node) in params:
            return params[id(node)]
        if not (isinstance(node, Item) and isinstance(node.index, int) and node.inputs):
            return None
        call = node.inputs[0]
        if not isinstance(call, Call) or node.index < 1:
            return None
        child = module
        for part in call.target.split("."):
            child = getattr(child, part, None)
        if not isinstance(child, nn.Module):
            return None
        carried = carried_arguments(child, index, depth + 1).get(node.index)
        if carried is None:
            return None
        name, position = carried
        passed = [x for x, slot in zip(call.inputs, call.slots) if slot in (name, position)]
        if len(passed) != 1:
            return None
        node = passed[0]
    return None
