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
    heterogeneous config (one value for the whole model does not exist). A dotted name reads a
    field of a sub-config (`ffn_config.moe_num_experts`)."""
    if name in per_layer_fields(config):
        return default
    *path, last = name.split(".")
    for part in path:
        config = getattr(config, part, None)
        if config is None:
            return default
    return getattr(config, last, default)


def sub_configs(config: Any) -> tuple[str, ...]:
    """The attributes of `config` that hold configs of their own (DBRX's `attn_config`,
    `ffn_config`): a size may live there rather than on the config itself."""
    from transformers import PretrainedConfig

    return tuple(sorted(k for k, v in vars(config).items() if isinstance(v, PretrainedConfig)))


def has_field(config: Any, name: str) -> bool:
    """Whether `config` has field `name`, a per-layer one included (whose global read a
    heterogeneous config refuses)."""
    if name in per_layer_fields(config):
        return True
    try:
        return hasattr(config, name)
    except Exception:  # a config refusing the read still has the field
        return True


def field_names(config: Any, name: str) -> tuple[str, ...]:
    """Where `config` holds field `name`: itself (`name`), else each sub-config that has it
    (`ffn_config.name`); none when neither does."""
    if has_field(config, name):
        return (name,)
    return tuple(f"{s}.{name}" for s in sub_configs(config) if has_field(getattr(config, s), name))
