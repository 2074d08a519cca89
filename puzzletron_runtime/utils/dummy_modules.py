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
    output; `tuple_size` pads that tuple with Nones for loops that unpack more values from it
    (GLM-MoE-DSA: `hidden_states, topk_indices = decoder_layer(...)`); `attributes` are copied on as plain attributes for loops that read them (e.g.
    `attention_type` to choose a mask).
    """

    def __init__(
        self,
        block_index: int,
        returns_tuple: bool = False,
        attributes: Mapping[str, Any] | None = None,
        tuple_size: int = 1,
    ):
        super().__init__()
        if tuple_size < 1 or (tuple_size > 1 and not returns_tuple):
            raise ValueError(f"tuple_size={tuple_size} needs returns_tuple and at least 1")
        self.block_index = block_index
        self.returns_tuple = returns_tuple
        self.tuple_size = tuple_size
        for name, value in (attributes or {}).items():
            setattr(self, name, value)

    def forward(self, *args, **kwargs):
        hidden_states = find_hidden_states(args, kwargs)
        if not self.returns_tuple:
            return hidden_states
        return (hidden_states,) + (None,) * (self.tuple_size - 1)

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}, returns_tuple={self.returns_tuple}"


class DummyInputEmbedding(nn.Module):
    """Stands in for the input embedding on a shard without block 0.

    Token ids fed to such a shard are an error. One lookup is not: a multimodal model given
    `inputs_embeds` embeds a single special token id (a 0-d tensor) to find image / audio
    placeholders by equality (Gemma 4 unified's `get_placeholder_mask`); with the embedding's
    width, that lookup returns NaNs, which equal no hidden state, so no position is taken for a
    placeholder."""

    def __init__(self, embedding_dim: int | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        ids = args[0] if args else next(iter(kwargs.values()), None)
        if self.embedding_dim is not None and isinstance(ids, torch.Tensor) and ids.dim() == 0:
            return torch.full(
                (self.embedding_dim,), float("nan"), dtype=self.dtype, device=ids.device
            )
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
