"""Tiny configs: a config class's defaults shrunk to a small but structurally faithful model.

The probe traces and verifies on these; tests build their models from them. One synthesiser
serves every config class, by generic rules applied to the default config's own fields:

- widths: hidden 64, FFN 128, 4 attention heads of head_dim 16, 2 KV heads (or 4, or 1, when the
  default has as many KV heads as heads, or one); every other
  head-dimension-like field (`rotary_dim`, `qk_rope_head_dim`, `v_head_dim`, ...) scaled by the
  same ratio as head_dim, so partial rotary and split heads keep their proportions;
- layers: at least TINY_LAYERS, and enough that every kind of a per-layer pattern (a list as
  long as the stack: `layer_types`, `attention_layers`, ...; or a list of layer indices such as
  `full_attn_idxs`) appears; each per-layer list is cut to that many layers;
- RoPE parameters: per-frequency lists (longrope's `short_factor` / `long_factor`) cut to the
  tiny rotary width, per-layer-type parameter dicts shrunk alike;
- vocabulary 256, with every special token id moved inside it;
- tied embeddings as the model defines them (never touched);
- nested configs (text, vision, audio) shrunk by the same rules and passed back as dicts.

Only fields the default config has (with a non-None value) are set, and the config class
recomputes what derives from them. Config classes whose defaults do not build, or whose derived
fields need a nudge, have one entry each in FIXUPS, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

TINY_LAYERS = 4
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, POSITIONS = 64, 128, 4, 2, 16, 256, 128
MAX_LAYERS = 16  # a pattern whose kinds need more layers than this is cut here

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# field -> value; applied when the default config has the field with a non-None value
TINY_SIZES: dict[str, int] = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "intermediate_size": FFN,
    "n_inner": FFN,
    "ffn_dim": FFN,
    "ffn_hidden_size": FFN,
    "d_ff": FFN,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    "n_positions": POSITIONS,
    "n_ctx": POSITIONS,
    # experts: few and small (dense models do not have these fields)
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 64,
}
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# routed experts split into groups (DeepSeek-V3's group-limited routing): with few experts, one
# group, of which one is picked
_EXPERT_GROUPS = ("n_group", "num_expert_group", "n_expert_groups", "moe_n_group")
_EXPERT_GROUP_TOPK = ("topk_group", "topk_groups", "moe_topk_group")
_HEAD_DIM_LIKE = ("_head_dim", "rotary_dim", "rope_dim", "head_size")
_RANK_LIKE = ("_lora_rank",)


@dataclass(frozen=True)
class Fixup:
    """What one config class needs beyond the generic rules."""

    reason: str
    build: dict[str, Any] = field(default_factory=dict)  # kwargs for the default config itself
    tiny: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None  # extra tiny kwargs


def _gpt_neo_pattern(kwargs: dict[str, Any], default: Any) -> dict[str, Any]:
    layers = kwargs.get("num_layers", TINY_LAYERS)
    pattern = default.attention_types[0][0]
    return {"attention_types": [[pattern, max(1, layers // len(pattern))]]}


# model_type -> the one thing its defaults lack (kept to the types that need it)
FIXUPS: dict[str, Fixup] = {
    "ministral": Fixup(
        "head_dim defaults to None, which the attention uses as a number (hidden 4096 / 32 heads)",
        build={"head_dim": 128},
    ),
    "hunyuan_v1_dense": Fixup(
        "head_dim defaults to None, which the attention uses as a number (hidden 4096 / 32 heads)",
        build={"head_dim": 128},
    ),
    "nemotron": Fixup(
        "num_key_value_heads defaults to None, which the attention divides by (48 heads: MHA)",
        build={"num_key_value_heads": 48},
    ),
    "cohere_compass_text": Fixup(
        "rope_parameters default to {}, but the rotary embedding reads one entry per layer type",
        build={
            "rope_parameters": {
                "full_attention": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [24, 20, 20],
                }
            }
        },
    ),
    "gpt_neo": Fixup(
        "attention_layers is derived from attention_types (pattern, repeat count), not cut",
        tiny=_gpt_neo_pattern,
    ),
}


def _layer_count(values: dict[str, Any]) -> tuple[str, int] | None:
    for name in LAYER_FIELDS:
        if isinstance(values.get(name), int) and values[name] > 0:
            return name, values[name]
    return None


def _per_layer(values: dict[str, Any], n: int) -> tuple[dict[str, list], dict[str, list[int]]]:
    """Lists as long as the stack, and lists of layer indices (sorted distinct ints below n
    under a name that speaks of layers or indices). A dict keyed by layer indices
    (`per_layer_config`) is read as the per-layer list of its values (None where absent)."""
    lists, indices = {}, {}
    for key, value in values.items():
        layered = any(w in key for w in ("idx", "layer", "indices"))
        if (
            layered
            and isinstance(value, dict)
            and value
            and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n for k in value)
        ):
            lists[key] = [value.get(i) for i in range(n)]
            continue
        if not isinstance(value, (list, tuple)) or key.endswith("token_id"):
            continue
        if (
            layered
            and value
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            and all(0 <= i < n for i in value)
            and list(value) == sorted(set(value))
        ):
            indices[key] = list(value)
        elif len(value) == n and n > 1:
            lists[key] = list(value)
    return lists, indices


def _periodic(values: dict[str, Any]) -> int:
    """Layers needed to show every kind of a `X_period` / `X_offset` pattern (Jamba: attention
    every 8th layer from layer 4): the last offset, plus one."""
    need = 0
    for key, offset in values.items():
        if not key.endswith("_offset") or not isinstance(offset, int) or isinstance(offset, bool):
            continue
        period = values.get(key[: -len("_offset")] + "_period")
        if isinstance(period, int) and not isinstance(period, bool) and 0 <= offset < period:
            need = max(need, offset + 1, 2)
    return need


def _layers_needed(lists: dict[str, list], indices: dict[str, list[int]], n: int) -> int:
    """The fewest layers, at least TINY_LAYERS, whose prefix shows every kind of every pattern."""
    patterns = [[repr(v) for v in lst] for lst in lists.values()]
    patterns += [[i in set(idx) for i in range(n)] for idx in indices.values()]
    need = TINY_LAYERS
    for p in patterns:
        kinds = set(p)
        for k in range(1, len(p) + 1):
            if set(p[:k]) == kinds:
                need = max(need, k)
                break
    return min(need, max(MAX_LAYERS, TINY_LAYERS))


def _resized(values: list, n: int) -> list:
    """`values` cut to n entries, or repeated cyclically up to n (a stack shorter than n)."""
    return [values[i % len(values)] for i in range(n)]


def _scaled(value: int, ratio: float, minimum: int = 2, multiple: int = 2) -> int:
    scaled = max(minimum, int(round(value * ratio / multiple)) * multiple)
    return min(scaled, value)


def _shrink_rope(rope: Any, half: int, tiny_half: int) -> Any:
    """RoPE parameters for the tiny rotary width: per-frequency lists (one value per rotary
    pair, `half` long: longrope's factors) cut to `tiny_half`, sections that split the pairs
    (`mrope_section`, summing to `half`) scaled to sum to `tiny_half`."""
    if not isinstance(rope, dict):
        return rope
    out = {}
    for key, value in rope.items():
        numbers = (
            isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value)
        )
        if isinstance(value, dict):
            out[key] = _shrink_rope(value, half, tiny_half)
        elif numbers and len(value) == half:
            out[key] = value[:tiny_half]
        elif numbers and all(isinstance(x, int) for x in value) and sum(value) == half:
            parts = [max(1, x * tiny_half // half) for x in value]
            parts[-1] += tiny_half - sum(parts)
            out[key] = parts
        else:
            out[key] = value
    return out


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def tiny_overrides(default_config: Any) -> dict[str, Any]:
    """The keyword arguments that turn `type(default_config)()` into a tiny config."""
    present = default_config.to_dict()
    overrides: dict[str, Any] = {k: v for k, v in TINY_SIZES.items() if present.get(k) is not None}

    # layers and per-layer patterns
    count = _layer_count(present)
    if count is not None:
        name, n = count
        lists, indices = _per_layer(present, n)
        tiny_n = max(_layers_needed(lists, indices, n), _periodic(present))
        for layer_field in LAYER_FIELDS:
            if isinstance(present.get(layer_field), int) and present[layer_field] == n:
                overrides[layer_field] = tiny_n
        for key, value in lists.items():
            resized = _resized(value, tiny_n)
            if isinstance(present[key], dict):
                resized = {i: v for i, v in enumerate(resized) if v is not None}
            overrides[key] = resized
        for key, value in indices.items():
            marks = _resized([i in set(value) for i in range(n)], tiny_n)
            overrides[key] = [i for i, marked in enumerate(marks) if marked]

    # KV heads keep the attention's kind: multi-head stays multi-head (MLA needs it), multi-query
    # stays multi-query, grouped stays grouped
    heads = present.get("num_attention_heads") or present.get("n_head") or present.get("num_heads")
    for key in KV_HEAD_FIELDS:
        kv = present.get(key)
        if isinstance(kv, int) and not isinstance(kv, bool) and kv > 0:
            overrides[key] = HEADS if kv == heads else 1 if kv == 1 else KV_HEADS

    # head-dimension-like fields keep their ratio to head_dim
    hidden = present.get("hidden_size") or present.get("n_embd") or present.get("d_model")
    head_dim = present.get("head_dim")
    if not isinstance(head_dim, int) and isinstance(heads, int) and isinstance(hidden, int):
        head_dim = hidden // heads if heads else None
    ratio = HEAD_DIM / head_dim if isinstance(head_dim, int) and head_dim > 0 else None
    for key, value in present.items():
        if key in overrides or not isinstance(value, int) or isinstance(value, bool):
            continue
        if ratio is not None and key.endswith(_HEAD_DIM_LIKE) and value > 0:
            overrides[key] = _scaled(value, ratio)
        elif key.endswith(_RANK_LIKE) and value > 0 and isinstance(hidden, int):
            overrides[key] = _scaled(value, HIDDEN / hidden, minimum=8, multiple=8)
        elif key in _EXPERT_COUNTS and value > 4:
            overrides[key] = 4
        elif key in _EXPERT_GROUPS + _EXPERT_GROUP_TOPK and value > 1:
            overrides[key] = 1
    if isinstance(present.get("num_experts_per_tok"), int):
        overrides["num_experts_per_tok"] = min(present["num_experts_per_tok"], 2)

    # RoPE per-frequency lists follow the rotary width
    rope = present.get("rope_parameters")
    if ratio is not None and isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor", present.get("partial_rotary_factor")) or 1.0
        half = int(head_dim * partial) // 2
        tiny_half = int(HEAD_DIM * partial) // 2
        overrides["rope_parameters"] = _shrink_rope(rope, half, tiny_half)

    # token ids inside the tiny vocabulary
    vocab = overrides.get("vocab_size", present.get("vocab_size"))
    if isinstance(vocab, int):
        spare = vocab - 1
        for key, value in present.items():
            if not key.endswith("_token_id"):
                continue
            if isinstance(value, int) and value >= vocab:
                overrides[key], spare = spare, spare - 1
            elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
                ids = []
                for v in value:
                    if isinstance(v, int) and v >= vocab:
                        v, spare = spare, spare - 1
                    ids.append(v)
                overrides[key] = ids

    # nested configs (text, vision, audio): shrunk alike, passed back as dicts
    for key, value in vars(default_config).items():
        if _is_config(value):
            overrides[key] = {**value.to_dict(), **tiny_overrides(value)}
    return overrides


def default_config(config_cls: type) -> Any:
    """The config class's default instance (with its FIXUPS build arguments, if any)."""
    fixup = FIXUPS.get(getattr(config_cls, "model_type", ""))
    return config_cls(**(fixup.build if fixup else {}))


def tiny_config(config_cls: type, **extra: Any) -> Any:
    """A tiny instance of `config_cls`; `extra` overrides win (e.g. tie_word_embeddings=True)."""
    default = default_config(config_cls)
    fixup = FIXUPS.get(getattr(config_cls, "model_type", ""))
    kwargs = {**(fixup.build if fixup else {}), **tiny_overrides(default)}
    if fixup and fixup.tiny:
        kwargs.update(fixup.tiny(kwargs, default))
    kwargs.update(extra)
    return config_cls(**kwargs)
