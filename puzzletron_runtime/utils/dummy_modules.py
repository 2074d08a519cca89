"""Parameter-free placeholders for the parts of a model a shard does not own."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..puzzformer.no_op import find_hidden_states

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


class HollowModule(nn.Module):
    """A parameter-free shell of a module inside a layer another shard owns: the same child
    names, plain attributes and buffers outside the state dict (see `carry_structure`), never
    run. Model code outside the layer loop that reads into its layers finds what it reads
    (RecurrentGemma's `_setup_cache` asks `hasattr(layer.temporal_block, "_setup_cache")`;
    Falcon-H1's `_init_weights` fills `layer.mamba.mup_vector`), and the shell's own class has
    none of the original's methods, so such code treats it as a module with nothing to set up."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.hollow_of = type(original).__name__
        carry_structure(self, original)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.hollow_of} belongs to a decoder layer another shard owns; it cannot run here"
        )

    def extra_repr(self) -> str:
        return f"hollow {self.hollow_of}"


def carry_structure(target: nn.Module, original: nn.Module) -> nn.Module:
    """Give `target` (the stand-in for `original`) what model code can read from `original`
    without running it, where `target` has nothing of that name: its plain attributes (neither
    tensors nor modules: `attention_type`, `layer_idx`, `block_type`), its buffers outside the
    state dict (non-persistent: computed, never loaded), and for each child a `HollowModule`
    of it. Parameters and persistent buffers are never carried, so the state dict, and what a
    loader reads, stays the stand-in's own. Returns `target`."""
    for name, value in vars(original).items():
        if name.startswith("_") or name == "training" or isinstance(value, torch.Tensor):
            continue
        if isinstance(value, nn.Module) or hasattr(target, name):
            continue
        setattr(target, name, value)
    for name in sorted(original._non_persistent_buffers_set):
        buffer = original._buffers.get(name)
        if buffer is not None and not hasattr(target, name):
            target.register_buffer(name, buffer, persistent=False)
    for name, child in original.named_children():
        if not hasattr(target, name):
            setattr(target, name, HollowModule(child))
    return target


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
