"""Stand-ins that turn a subblock into a no-op.

`Same` passes its input through (norms around a removed subblock); `MatchingZeros` returns zeros
shaped like its input (the module whose output is added to the residual); `ProjectedZeros`
returns zeros of another last dimension (a projection between widths inside a removed subblock:
Gemma 4's per-layer input gate and projection); `PassResidual`
returns the residual a module adds to its own output (`self.mlp(x, residual)`: Bloom, MPT); and
`return_tuple_of_size` wraps either for call sites that unpack a tuple
(`hidden_states, _ = self.self_attn(...)`), `return_list_of_size` for modules that return a
list, which the call site may concatenate with another list (OpenAI-GPT's block:
`[h] + attn_outputs[1:]`). `return_tuple_carrying` is `return_tuple_of_size` for a module that
hands one of its arguments back in its tuple (RWKV's `return out, state`: the recurrent state it
was given, updated in place): the stand-in hands that argument back unchanged in the same place,
so that the caller, which threads it on, still has it. None of them holds parameters or buffers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = [
    "MatchingZeros",
    "PassResidual",
    "ProjectedZeros",
    "Same",
    "find_hidden_states",
    "passed_argument",
    "return_list_of_size",
    "return_tuple_carrying",
    "return_tuple_of_size",
]

# keyword names under which model code passes the hidden states to a submodule
HIDDEN_STATE_KEYWORDS = (
    "hidden_states",
    "hidden_state",
    "x",
    "input",
    "inputs",
    "input_tensor",
    "hidden",
    "inputs_embeds",
)


def find_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a submodule was called on: the first positional argument, else a known
    keyword (never another tensor keyword such as an attention mask)."""
    if args and args[0] is not None:
        return args[0]
    for name in HIDDEN_STATE_KEYWORDS:
        value = kwargs.get(name)
        if value is not None:
            return value
    raise TypeError(
        "no-op module called without hidden states: pass them positionally or as one of "
        + ", ".join(HIDDEN_STATE_KEYWORDS)
    )


class Same(nn.Module):
    """Returns its input unchanged."""

    def forward(self, *args, **kwargs):
        return find_hidden_states(args, kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor, for model code that reads `.weight.dtype` of a replaced norm."""
        return torch.empty(0)


class MatchingZeros(nn.Module):
    """Returns zeros like its input: added to the residual, it leaves the residual unchanged."""

    def forward(self, *args, **kwargs):
        return torch.zeros_like(find_hidden_states(args, kwargs))


class ProjectedZeros(nn.Module):
    """Returns zeros like its input but `width` wide in the last dimension: the no-op of a
    projection from one width to another (`nn.Linear(a, b)` gives `b`), where zeros like its
    input would have the wrong width for what reads its output."""

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)

    def forward(self, *args, **kwargs):
        x = find_hidden_states(args, kwargs)
        return x.new_zeros(*x.shape[:-1], self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}"


class PassResidual(nn.Module):
    """For a module that adds the residual it is passed to its own output: returns that
    residual (its output with the branch removed). `position` is where the call site passes it
    positionally (None: by keyword), `keyword` the parameter's name."""

    def __init__(self, position: int | None, keyword: str):
        super().__init__()
        self.position = position
        self.keyword = keyword

    def forward(self, *args, **kwargs):
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        if kwargs.get(self.keyword) is not None:
            return kwargs[self.keyword]
        raise TypeError(f"no-op module called without its residual argument {self.keyword!r}")

    def extra_repr(self) -> str:
        return f"position={self.position}, keyword={self.keyword!r}"


@functools.cache
def return_tuple_of_size(cls: type[nn.Module], size: int) -> type[nn.Module]:
    """A subclass of `cls` whose forward returns a tuple of `size`: the tensor, then Nones.

    Cached, so the same (cls, size) always gives the same class.
    """
    return _returning(cls, size, tuple)


@functools.cache
def return_tuple_carrying(
    cls: type[nn.Module], size: int, carried: tuple[tuple[int, str, int], ...]
) -> type[nn.Module]:
    """A subclass of `cls` whose forward returns a tuple of `size`: the tensor, then Nones,
    except that each place `index` of `carried` = ((index, keyword, position), ...) holds the
    argument the stand-in was called with under `keyword` or at `position` (None if neither).

    Cached, so the same arguments always give the same class.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    places = {}
    for index, keyword, position in carried:
        if not 0 < index < size or index in places:
            raise ValueError(f"carried place {index} is not a place 1..{size - 1} of its own")
        places[index] = (keyword, position)

    def forward(self, *args, **kwargs):
        out = [cls.forward(self, *args, **kwargs)] + [None] * (size - 1)
        for index, (keyword, position) in places.items():
            out[index] = passed_argument(args, kwargs, keyword, position)
        return tuple(out)

    def extra_repr(self) -> str:
        handed = ", ".join(f"{k!r} at {i}" for i, (k, _) in sorted(places.items()))
        return f"returns a tuple of {size}, handing back {handed}"

    return type(
        f"{cls.__name__}TupleOf{size}Carrying",
        (cls,),
        {"forward": forward, "extra_repr": extra_repr, "__module__": __name__},
    )


def passed_argument(args: tuple, kwargs: dict, keyword: str, position: int):
    """The argument a module was called with as `keyword`, or at `position` among its positional
    arguments; None when the caller left it out (the default of the arguments handed back)."""
    if keyword in kwargs:
        return kwargs[keyword]
    return args[position] if len(args) > position else None


@functools.cache
def return_list_of_size(cls: type[nn.Module], size: int) -> type[nn.Module]:
    """A subclass of `cls` whose forward returns a list of `size`: the tensor, then Nones (for a
    module that returns a list, which its caller may extend with `+`).

    Cached, so the same (cls, size) always gives the same class.
    """
    return _returning(cls, size, list)


def _returning(cls: type[nn.Module], size: int, container: type) -> type[nn.Module]:
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    kind = container.__name__

    def forward(self, *args, **kwargs):
        out = cls.forward(self, *args, **kwargs)
        return container((out,) + (None,) * (size - 1))

    def extra_repr(self) -> str:
        return f"returns a {kind} of {size}"

    return type(
        f"{cls.__name__}{kind.capitalize()}Of{size}",
        (cls,),
        {"forward": forward, "extra_repr": extra_repr, "__module__": __name__},
    )
