"""Small configs: the default config of a model type with its sizes shrunk.

The probe traces and verifies on these; tests build their models from them. Only fields the
default config actually has are set, and the config class recomputes what derives from them
(layer_types, head_dim defaults), so the tiny config is a config the model type really accepts.
"""

from __future__ import annotations

from typing import Any

TINY_LAYERS = 4

# field -> value; applied when the default config has the field with a non-None value
TINY_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "ffn_hidden_size": 128,
    "num_hidden_layers": TINY_LAYERS,
    "n_layer": TINY_LAYERS,
    "num_layers": TINY_LAYERS,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "n_positions": 128,
}


def tiny_overrides(default_config: Any) -> dict[str, Any]:
    """The keyword arguments that turn `type(default_config)()` into a tiny config."""
    present = default_config.to_dict()
    overrides = {k: v for k, v in TINY_SIZES.items() if present.get(k) is not None}
    vocab = overrides.get("vocab_size", present.get("vocab_size"))
    for key, value in present.items():
        if key.endswith("_token_id") and isinstance(value, int) and vocab and value >= vocab:
            overrides[key] = None  # token ids outside the tiny vocabulary
    return overrides


def tiny_config(config_cls: type, **extra: Any) -> Any:
    """A tiny instance of `config_cls`; `extra` overrides win (e.g. tie_word_embeddings=True)."""
    default = config_cls()
    kwargs = {**tiny_overrides(default), **extra}
    return config_cls(**kwargs)
