"""deci_x_patcher: build a heterogeneous model from an unmodified transformers modeling file.

While the context is active, each decoder-layer class of the descriptor builds layer i from a
copy of its config updated with the overrides of block config i, then turns the subblocks that
block i marks `no_op` into no-ops. The layer index is read from the constructor's bound
arguments, never from the caller's stack frames. A layer class whose constructor has no index
parameter at all (OpenAI-GPT's `Block(n_positions, config, scale)`) is numbered by construction
order inside the context: its k-th construction is layer k. The context yields a `BuiltLayers`
record (layer index -> the module built for it), so a caller that holds the model can check that
every layer sits where its index says (`BuiltLayers.check_positions`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from ..block_config import BlockConfig, maybe_cast_block_configs
from ..utils.hollow import carry_structure

__all__ = ["LAYER_INDEX_ARGUMENTS", "BuiltLayers", "deci_x_patcher", "set_config_field"]

# constructor argument names that carry a decoder layer's index, in order of preference
LAYER_INDEX_ARGUMENTS = ("layer_idx", "layer_id", "layer_index", "layer_number", "idx")

_LOCK = threading.RLock()
_constructing = threading.local()


def _in_progress() -> set[int]:
    if not hasattr(_constructing, "ids"):
        _constructing.ids = set()
    return _constructing.ids


def _config_argument(signature: inspect.Signature, bound: inspect.BoundArguments) -> str:
    if "config" in bound.arguments:
        return "config"
    names = [n for n in signature.parameters][1:]  # after self
    if names and names[0] in bound.arguments:
        return names[0]
    raise TypeError("the decoder layer was built without a config argument")


class BuiltLayers:
    """The layers one `deci_x_patcher` context built with block configs: index -> module."""

    def __init__(self) -> None:
        self.layers: dict[int, Any] = {}
        self.block_count = 0  # the number of block configs the layers were built against
        self.next_in_order = 0  # the index the next layer numbered by construction order gets

    def add(self, index: int, layer: Any, block_count: int) -> None:
        if index in self.layers:
            raise ValueError(
                f"{type(layer).__name__} layer {index} is built twice: block configs "
                "cannot be applied per layer"
            )
        self.layers[index] = layer
        self.block_count = max(self.block_count, block_count)

    def check_positions(self, model: Any, layer_block_name) -> None:
        """Each layer built as layer i is the module at `layer_block_name(i)` in `model`: a model
        that builds its layers in another order than its stack holds them is refused, since
        layers numbered by construction order would then get another layer's block config."""
        for index, layer in sorted(self.layers.items()):
            name = layer_block_name(index)
            try:
                found = model.get_submodule(name)
            except AttributeError:
                found = None
            if found is not layer:
                raise ValueError(
                    f"{type(layer).__name__} built as layer {index} is not the model's {name}: "
                    "its block config would describe another layer"
                )


def _has_index_parameter(signature: inspect.Signature) -> bool:
    """Whether the constructor can receive a layer index: a parameter of an index name, or
    *args / **kwargs that could carry one."""
    return any(
        p.name in LAYER_INDEX_ARGUMENTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


def _layer_index(cls: type, bound: inspect.BoundArguments) -> int:
    """The index the caller passed. A signature default is never used: a loop that forgot to
    pass the index would otherwise build every layer from block 0."""
    passed = dict(bound.arguments)
    for param in bound.signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:  # an index passed through **kwargs
            passed = {**passed.pop(param.name, {}), **passed}
    for name in LAYER_INDEX_ARGUMENTS:
        value = passed.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise TypeError(
        f"{cls.__name__}.__init__ received no layer index (one of "
        f"{', '.join(LAYER_INDEX_ARGUMENTS)}), so block configs cannot be applied per layer"
    )


def set_config_field(config: Any, field: str, value: Any) -> None:
    """`config.<field> = value`; a dotted field sets a field of a sub-config the config holds
    (DBRX's `ffn_config.moe_num_experts`: the experts read their sizes from `config.ffn_config`)."""
    *path, last = field.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, last, value)


def _layer_config(config: Any, overrides: dict[str, Any]) -> Any:
    layer_config = copy.deepcopy(config)  # sub-configs included: a layer's own copies
    for key, value in overrides.items():
        if value is not None:
            set_config_field(layer_config, key, value)
    return layer_config


def _patched_init(
    descriptor: Any,
    cls: type,
    original,
    explicit: list[BlockConfig] | None,
    built: BuiltLayers,
):
    """`built` collects every layer built with block configs. A class without any index
    parameter is numbered by construction order; one with an index parameter must be passed
    the index."""
    signature = inspect.signature(original)
    in_order = not _has_index_parameter(signature)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if id(self) in _in_progress():  # a patched base class inside a patched subclass
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        _refuse_wrapping(cls, bound, built)
        config_name = _config_argument(signature, bound)
        config = bound.arguments[config_name]
        block_configs = explicit
        if block_configs is None:
            block_configs = maybe_cast_block_configs(getattr(config, "block_configs", None))
        if block_configs is None:
            return original(self, *args, **kwargs)
        if in_order:
            index = built.next_in_order
            built.next_in_order += 1
        else:
            index = _layer_index(cls, bound)
        if not 0 <= index < len(block_configs):
            raise ValueError(
                f"{cls.__name__} layer {index} is built, but there are {len(block_configs)} "
                f"block configs: one is needed per layer"
            )
        built.add(index, self, len(block_configs))
        block = block_configs[index]
        bound.arguments[config_name] = _layer_config(
            config, descriptor.block_config_to_layer_overrides(block)
        )
        _in_progress().add(id(self))
        try:
            original(*bound.args, **bound.kwargs)
        finally:
            _in_progress().discard(id(self))
        children = dict(self.named_children())
        for subblock, kind, prefix in (
            (block.attention, "attention", "attn"),
            (block.ffn, "FFN", "mlp"),
        ):
            if not subblock.no_op:
                continue
            if not getattr(descriptor, f"{prefix}_no_op_supported")():
                raise NotImplementedError(
                    f"{descriptor.__name__} does not support an {kind} no-op "
                    f"(it does not override {prefix}_no_op_post_init)"
                )
            getattr(descriptor, f"{prefix}_no_op_post_init")(decoder_layer=self)
        _hollow_out(self, children)

    return __init__


def _refuse_wrapping(cls: type, bound: inspect.BoundArguments, built: BuiltLayers) -> None:
    """A decoder layer made of another one built before it with a block config (Zamba's hybrid
    layer wraps a Mamba layer, a linear and an attention block that several hybrid layers share)
    has no block config of its own to take: refused, naming both."""
    layers = {id(layer): index for index, layer in built.layers.items()}
    for name, value in bound.arguments.items():
        if id(value) in layers:
            raise ValueError(
                f"{cls.__name__} is built from {type(value).__name__} layer {layers[id(value)]} "
                f"(its argument {name!r}), which was built before it with that layer's block "
                "config: a decoder layer made of other decoder layers cannot take block configs "
                "per layer"
            )


def _hollow_out(layer: nn.Module, before: dict[str, nn.Module]) -> None:
    """Each weightless stand-in a no-op put in place of a child carries that child's shape
    without its weights (`carry_structure`): model code outside the layer may read into it
    (RWKV's `_rescale_layers` divides `block.attention.output.weight` in place)."""
    for name, old in before.items():
        new = getattr(layer, name, None)
        if (
            isinstance(new, nn.Module)
            and new is not old
            and not any(True for _ in new.parameters())
        ):
            carry_structure(new, old)


def _check_all_built(built: BuiltLayers) -> None:
    """Every block config was used: a model with fewer layers than block configs is refused."""
    if not built.layers:
        return
    expected = built.block_count
    if len(built.layers) != expected:
        missing = sorted(set(range(expected)) - set(built.layers))
        raise ValueError(
            f"{expected} block configs were given but {len(built.layers)} layer(s) were built "
            f"(no layer {', '.join(map(str, missing[:8]))}): one block config per layer"
        )


@contextmanager
def deci_x_patcher(
    model_descriptor: Any, block_configs: list[BlockConfig | dict] | None = None
) -> Iterator[BuiltLayers]:
    """Patch the descriptor's decoder-layer classes for heterogeneous construction.

    `block_configs` (BlockConfigs or config.json dicts, one per layer) default to the
    `block_configs` of the config each layer is built with; without any, layers are built
    unchanged. With block configs, a layer class with an index parameter must be passed its
    index (a default is not used); one without any index parameter is numbered by construction
    order. The layers built must be exactly one per block config: a layer index beyond the list,
    an index built twice, or (on leaving the context) a block config no layer used raise
    ValueError, because each would silently build another model than the one described. The
    context yields the `BuiltLayers` record. The original constructors are restored on exit,
    also when construction raises.
    """
    from ..model_descriptor.model_descriptor_factory import ModelDescriptorFactory

    descriptor = ModelDescriptorFactory.get(model_descriptor)
    classes = descriptor.decoder_layer_cls()
    classes = list(classes) if isinstance(classes, (list, tuple)) else [classes]
    explicit = maybe_cast_block_configs(block_configs)
    built = BuiltLayers()
    with _LOCK:
        saved = [(cls, cls.__dict__.get("__init__")) for cls in classes]
        try:
            for cls in classes:
                cls.__init__ = _patched_init(descriptor, cls, cls.__init__, explicit, built)
            yield built
            _check_all_built(built)
        finally:
            for cls, own in reversed(saved):
                if own is None:
                    del cls.__init__  # it was inherited
                else:
                    cls.__init__ = own
