"""Parameter-free shells of the modules a stand-in replaces.

A stand-in (a dummy block for a layer another shard owns, a no-op for a removed subblock) must
not hold weights, but the model's own code may still read into the module it replaced, outside
that module's forward: RecurrentGemma's `_setup_cache` asks
`hasattr(layer.temporal_block, "_setup_cache")` of every layer, Falcon-H1's `_init_weights`
fills `layer.mamba.mup_vector`, RWKV's `_rescale_layers` divides
`block.attention.output.weight` of every block in place. `carry_structure` gives the stand-in
what such code finds, without any tensor a checkpoint holds.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HollowModule", "carry_structure"]


class HollowModule(nn.Module):
    """A parameter-free shell of `original`: the same child names (shells too), plain attributes
    and buffers outside the state dict (see `carry_structure`); never run. Its parameters and
    persistent buffers read as empty tensors of their dtype, outside the state dict, so that
    code adjusting them in place (`weight.div_(...)`) has nothing to do. Its own class has none
    of the original's methods: code that asks for one (`hasattr(m, "_setup_cache")`) finds
    nothing to set up."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.hollow_of = type(original).__name__
        self._placeholders: dict[str, torch.dtype] = {}
        carry_structure(self, original)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            dtype = self.__dict__.get("_placeholders", {}).get(name)
            if dtype is None:
                raise
            return torch.empty(0, dtype=dtype)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.hollow_of} belongs to a module a stand-in replaced; it cannot run here"
        )

    def extra_repr(self) -> str:
        return f"hollow {self.hollow_of}"


def carry_structure(target: nn.Module, original: nn.Module) -> nn.Module:
    """Give `target` (the stand-in for `original`) what model code can read from `original`
    without running it, where `target` has nothing of that name: its plain attributes (neither
    tensors nor modules: `attention_type`, `layer_idx`, `block_type`), its buffers outside the
    state dict (non-persistent: computed, never loaded), each child as a `HollowModule`, and
    (within a shell) its parameters and persistent buffers as empty tensors. Nothing is added to
    the state dict, so what a loader reads stays the stand-in's own. Returns
    `target`."""
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
    if isinstance(target, HollowModule):
        loaded = {**original._parameters, **original._buffers}
        target._placeholders.update(
            (name, tensor.dtype)
            for name, tensor in loaded.items()
            if tensor is not None and not hasattr(target, name)
        )
    return target
