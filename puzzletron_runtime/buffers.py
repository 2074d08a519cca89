"""Rebuild the buffers a meta-device build leaves empty, with transformers' own initialisation.

Buffers that are not in the state dict (rotary `inv_freq`, Gemma's `embed_scale`, GPT-J's
sinusoidal `embed_positions`, causal `bias` masks, `position_ids`, ...) are computed in a
module's `__init__`; on the meta device they are left without data, and a checkpoint does not
carry them. transformers 5 computes every one of them again in `PreTrainedModel._init_weights(module)`
(that is how `from_pretrained` fills them), so one mechanism serves every model: give each empty
buffer storage on the target device and run the `_init_weights` of the pretrained model that owns
the module, the way `initialize_weights` dispatches it, with every loaded tensor of that module's
subtree hidden from it, so that weights are never re-initialised.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["BufferRebuildError", "empty_buffers", "init_owners", "rebuild_buffers"]


class BufferRebuildError(RuntimeError):
    """A buffer the owning model's `_init_weights` cannot rebuild."""


def empty_buffers(model: nn.Module) -> dict[str, list[str]]:
    """{module path: [names of its own buffers still on the meta device]}, in module order."""
    found: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        names = [n for n, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if names:
            found[path] = names
    return found


def rebuild_buffers(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """Fill every buffer of `model` left on the meta device; return what was rebuilt.

    Each buffer keeps the dtype and shape it was built with and is placed on `device`. Raises
    BufferRebuildError when a module holding one has no pretrained model above it.
    """
    device = torch.device(device)
    todo = empty_buffers(model)
    if not todo:
        return todo
    owners = init_owners(model)
    for path, names in todo.items():
        module = model.get_submodule(path) if path else model
        for name in names:
            meta = module._buffers[name]
            module._buffers[name] = _sentinel(meta, device)
        owner = owners.get(path)
        if owner is None:
            raise BufferRebuildError(
                f"{path or 'the model'}: buffers {', '.join(names)} have no pretrained model "
                "above them whose _init_weights could rebuild them"
            )
        targets = {(path, n) for n in names}
        with _hidden_tensors(module, path, targets):
            owner._init_weights(module)
    _from_ancestors(model, todo, owners)
    return todo


def _from_ancestors(model: nn.Module, todo: dict[str, list[str]], owners) -> None:
    """Floating buffers the owner's `_init_weights(module)` left unset are filled by
    `_init_weights` of the modules above them, nearest first (Falcon-H1 computes each Mamba
    mixer's mup_vector in `_init_weights(FalconH1Model)`), with every other tensor hidden."""
    for path, names in todo.items():
        module = model.get_submodule(path) if path else model
        unset = [n for n in names if _unset(module._buffers[n])]
        if not unset:
            continue
        targets = {(path, n) for n in unset}
        parts = path.split(".") if path else []
        for depth in range(len(parts) - 1, -1, -1):
            above = ".".join(parts[:depth])
            owner = owners.get(above)
            if owner is None:
                break
            ancestor = model.get_submodule(above) if above else model
            with _hidden_tensors(ancestor, above, {(f"{p}", n) for p, n in targets}):
                owner._init_weights(ancestor)
            if not any(_unset(module._buffers[n]) for n in unset):
                break


def _unset(buffer: torch.Tensor) -> bool:
    return (buffer.is_floating_point() or buffer.is_complex()) and bool(torch.isnan(buffer).all())


def _sentinel(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Storage for a rebuilt buffer, filled so that a buffer `_init_weights` forgets is visible
    (NaN for floating point, zeros otherwise) rather than whatever memory held."""
    if meta.is_floating_point() or meta.is_complex():
        return torch.full(meta.shape, float("nan"), dtype=meta.dtype, device=device)
    return torch.zeros(meta.shape, dtype=meta.dtype, device=device)


def init_owners(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the pretrained model whose `_init_weights` initialises it: the nearest
    PreTrainedModel at or above it, as `PreTrainedModel.initialize_weights` dispatches."""
    from transformers import PreTrainedModel

    owners: dict[str, nn.Module] = {}

    def visit(module: nn.Module, path: str, owner: nn.Module | None) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        if owner is not None:
            owners[path] = owner
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, owner)

    visit(model, "", None)
    return owners


@contextlib.contextmanager
def _hidden_tensors(module: nn.Module, path: str, targets: set[tuple[str, str]]):
    """Swap every parameter and buffer below `module`, except `targets`, for an empty meta
    tensor of the same shape, so that `_init_weights` (which may re-initialise weights of the
    module and its children) cannot touch loaded values; restore the originals afterwards."""
    saved: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for sub_path, sub in module.named_modules(remove_duplicate=False):
            full = f"{path}.{sub_path}" if path and sub_path else (path or sub_path)
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or (full, name) in targets or tensor.device.type == "meta":
                        continue
                    saved.append((store, name, tensor))
                    empty = torch.empty_like(tensor, device="meta")
                    store[name] = (
                        nn.Parameter(empty, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter)
                        else empty
                    )
        yield
    finally:
        for store, name, tensor in reversed(saved):
            store[name] = tensor
