"""Configs with per-layer values (transformers' heterogeneous configs: `per_layer_config`).

Such a config refuses a read of a per-layer field on the whole model
(`AmbiguousGlobalPerLayerAttributeError`): each layer reads its own value through
`config.per_layer_config[layer_idx]`. A block config's size is written to the layer's config as
one global field, which a layer's own entry would shadow, so a per-layer field is never a
block-config size: the readers here treat it as absent.
"""

from __future__ import annotations

from typing import Any


def per_layer_fields(config: Any) -> frozenset[str]:
    """The fields a heterogeneous config holds per layer (none for any other config)."""
    if not getattr(config, "is_heterogeneous", False):
        return frozenset()
    return frozenset(getattr(config, "per_layer_attributes", None) or ())


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """`getattr(config, name, default)`, but `default` for a per-layer field of a
    heterogeneous config (one value for the whole model does not exist)."""
    if name in per_layer_fields(config):
        return default
    return getattr(config, name, default)
