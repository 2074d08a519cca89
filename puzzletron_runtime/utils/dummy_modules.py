"""Parameter-free placeholders for the parts of a model a shard does not own."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..puzzformer.no_op import find_hidden_states
from .hollow import HollowModule, carry_structure

__all__ = ["DummyBlock", "DummyInputEmbedding", "DummyOutputHead", "HollowModule", "carry_structure"]


class DummyBlock(nn.Module):
    """Stands in for a decoder block owned by another shard: passes the hidden states through.

    `returns_tuple` makes it return `(hidden_states,)` for model loops that index a layer's
    output; `attributes` are copied on as plain attributes for loops that read them (e.g.
    `attention_type` to choose a mask).
    """

    def __init__(
        self,
        block_index: int,
        returns_tuple: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.block_index = block_index
        self.returns_tuple = returns_tuple
        for name, value in (attributes or {}).items():
            setattr(self, name, value)

    def forward(self, *args, **kwargs):
        hidden_states = find_hidden_states(args, kwargs)
        return (hidden_states,) if self.returns_tuple else hidden_states

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}, returns_tuple={self.returns_tuple}"


class DummyInputEmbedding(nn.Module):
    """Stands in for the input embedding on a shard without block 0."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "this shard does not own the input embedding (block 0 lives on another shard): "
            "feed it hidden states, not token ids"
        )


class DummyOutputHead(nn.Module):
    """Stands in for the final norm or LM head on a shard without the last block: passes its
    input through.

    Some causal LMs read the head's weight dtype before calling it (Mamba:
    `self.lm_head(hidden_states.to(self.lm_head.weight.dtype))`): with `dtype`, the stand-in
    carries an empty `weight` of that dtype (on `device`, outside the state dict)."""

    def __init__(self, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        if dtype is not None:
            self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), False)

    def forward(self, *args, **kwargs):
        return find_hidden_states(args, kwargs)
