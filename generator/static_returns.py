"""What a module's forward returns (a tuple's length, or a single tensor), read from its parsed
source: the static stand-in for the traced forward of a tiny model."""

from __future__ import annotations


from torch import nn

from .analysis.dataflow import Call, FlowInterpreter, Input, Op, Pack, Phi, _State
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
