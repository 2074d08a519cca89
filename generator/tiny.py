"""Tiny configs: a config class's defaults shrunk to a small but structurally faithful model.

The probe traces and verifies on these; tests build their models from them. One synthesiser
serves every config class, by generic rules applied to the default config's own fields:

- widths: hidden 64, FFN 128, 4 attention heads of head_dim 16, 2 KV heads (or 4, or 1, when the
  default has as many KV heads as heads, or one; a prefixed KV-head count such as Inkling's
  `swa_num_key_value_heads` alike, against the head count of its prefix); every other
  head-dimension-like field (`rotary_dim`, `qk_rope_head_dim`, `v_head_dim`, ...) scaled by the
  same ratio as head_dim, so partial rotary and split heads keep their proportions;
- layers: at least TINY_LAYERS, and enough that every kind of a per-layer pattern (a list as
  long as the stack: `layer_types`, `attention_layers`, ...; or a list of layer indices such as
  `full_attn_idxs`) appears; each per-layer list is cut to that many layers, and the entries of
  a `per_layer_config` shrunk in proportion to their global field; a stack that is linear
  attention only by default (Bamba) gets a full-attention last layer, as its checkpoints have;
- other head counts (a linear-attention mixer's heads, an indexer's) scaled like the attention's
  heads;
- experts: 4 routed experts (also where the default has fewer: one expert routes nothing and
  has no smaller count) in one group, a routing top-k of at most 2 (and at most the expert
  count: a top-k left None beside routed experts gets one), expert widths 64;
- state-space mixers: heads of at most head_dim 16 that still span `hidden_size * expand`;
- RoPE parameters: per-frequency lists (longrope's `short_factor` / `long_factor`) cut to the
  tiny rotary width, per-layer-type parameter dicts shrunk alike;
- vocabulary 256, with every special token id moved inside it, and every other vocabulary
  (hashed n-grams, per-layer input embeddings) no larger;
- tied embeddings as the model defines them (never touched);
- nested configs (text, vision, audio) shrunk by the same rules and passed back as dicts, with
  the widths one sub-config takes from another (a vision merger's `out_hidden_size`) at 64.

Only fields the default config has (with a non-None value) are set, and the config class
recomputes what derives from them. Config classes whose defaults do not build, or whose derived
fields need a nudge, have one entry each in FIXUPS, with the reason.
"""

from __future__ import annotations

import math
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
    # widths of another config of the same model, which every tiny config shares: a vision
    # merger's output fed to the language model (Qwen-VL's `out_hidden_size`), BLT's local
    # encoder and decoder sized to its global transformer
    "out_hidden_size": HIDDEN,
    "hidden_size_global": HIDDEN,
}
# field -> value; applied when the default config has the field with a larger value (0 means
# "none of these": a config without shared experts keeps none)
TINY_CAPS: dict[str, int] = {
    "expert_ffn_hidden_size": 64,
    "shared_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
}
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_EXPERT_COUNTS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "zero_expert_num",  # LongCat-Flash's identity experts, routed to beside the others
)
# routed experts split into groups (DeepSeek-V3's group-limited routing): with few experts, one
# group, of which one is picked
_EXPERT_GROUPS = ("n_group", "num_expert_group", "n_expert_groups", "moe_n_group")
_EXPERT_GROUP_TOPK = ("topk_group", "topk_groups", "moe_topk_group")
# experts routed to per token: at most 2 and never more than the tiny expert count (a top-k over
# fewer experts than k fails: "selected index k out of range"); a list holds one per layer
_EXPERT_TOPK = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_k",
    "moe_topk",
    "moe_top_k",
    "top_k_experts",
)
TINY_EXPERTS, TINY_TOPK = 4, 2
_HEAD_DIM_LIKE = ("_head_dim", "rotary_dim", "rope_dim", "head_size")
# other vocabularies (hashed n-gram tables, per-layer input embeddings indexed by token id)
_VOCAB_LIKE = ("vocab_size", "_vocab", "vocab_size_per_layer_input")
_RANK_LIKE = ("_lora_rank",)
# other head counts (a linear-attention mixer's own heads, an indexer's): scaled like the
# attention's heads, so their ratios to each other hold (value heads a multiple of key heads)
_HEAD_COUNT_LIKE = ("_heads",)


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


def _two_shared_blocks(kwargs: dict[str, Any], default: Any) -> dict[str, Any]:
    kinds = list(default.layers_block_type)
    hybrids = [i for i, kind in enumerate(kinds) if kind == "hybrid"]
    layers = max(kwargs.get("num_hidden_layers", TINY_LAYERS), hybrids[1] + 1)
    return {"num_hidden_layers": layers, "layers_block_type": kinds[:layers]}


# model_type -> the one thing its defaults lack (kept to the types that need it)
FIXUPS: dict[str, Fixup] = {
    "falcon_h1": Fixup(
        "its Mamba widths have names of their own (mamba_d_ssm = mamba_n_heads x mamba_d_head), "
        "which the generic mixer rule does not know: left at default, a tiny forward takes 9 s",
        tiny=lambda kwargs, default: {
            "mamba_d_ssm": 64,
            "mamba_n_heads": 8,
            "mamba_d_head": 8,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
        },
    ),
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
    "hunyuan_v1_moe": Fixup(
        "head_dim defaults to None, which the attention uses as a number (hidden 4096 / 32 heads)",
        build={"head_dim": 128},
    ),
    "dbrx": Fixup(
        "the attention reads attn_config.rope_theta, which DbrxAttentionConfig does not define, "
        "and clamps q/k/v by clip_qkv, None by default (DBRX's: 500000 and 8); the defaults' "
        "one KV head and top-1 routing leave no smaller KV-head count or top-k to prove an "
        "override on (DBRX's: 8 KV heads, 16 experts, top-4)",
        build={
            "attn_config": {"rope_theta": 500000.0, "clip_qkv": 8, "kv_n_heads": 8},
            "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4},
        },
    ),
    "dots1": Fixup(
        "expert fields default to None, which the MoE layer sizes its tensors by "
        "(dots.llm1's: 128 routed experts, 2 shared, top-6, first layer dense)",
        build={
            "n_routed_experts": 128,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
        },
    ),
    "lfm2_moe": Fixup(
        "layer_types defaults to None, which each layer indexes (LFM2's pattern: convolution "
        "layers with full attention every 4th layer from layer 2)",
        build={"layer_types": ["full_attention" if i % 4 == 2 else "conv" for i in range(32)]},
    ),
    "qwen4_exp_text": Fixup(
        "every full-attention layer builds a QSA indexer, which divides indexer_budget by "
        "indexer_compress_ratio, both None by default (the config validates the five together; "
        "the index head holds the whole rotary width, 256)",
        build={
            "indexer_n_heads": 16,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 256,
            "indexer_budget": 2048,
            "indexer_compress_ratio": 4,
        },
    ),
    "zamba": Fixup(
        "one shared transformer block is tied across the hybrid layers; with a single hybrid "
        "layer transformers rejects the tie (its pattern finds no target), so two are kept",
        tiny=_two_shared_blocks,
    ),
    "blt": Fixup(
        "with use_cache its forward builds a cache from BltConfig, which has no layer count "
        "(the layers are in its encoder, global and decoder sub-configs)",
        tiny=lambda kwargs, default: {"use_cache": False},
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
    (`per_layer_config`; to_dict writes its keys as zero-padded strings) is read as the per-layer
    list of its values (None where absent)."""
    lists, indices = {}, {}
    for key, value in values.items():
        layered = any(w in key for w in ("idx", "layer", "indices"))
        keys = [_layer_index(k) for k in value] if isinstance(value, dict) else []
        if layered and keys and all(k is not None and 0 <= k < n for k in keys):
            by_index = dict(zip(keys, value.values()))
            lists[key] = [by_index.get(i) for i in range(n)]
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


def _layer_index(key: Any) -> int | None:
    if _is_int(key):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _shrink_layer_entries(
    entries: dict[int, Any], present: dict[str, Any], overrides: dict[str, Any]
) -> dict[int, Any]:
    """Per-layer config entries (`per_layer_config`: {layer: {field: value}}) shrunk in
    proportion to their global field: a layer with 64 heads where the default has 128 gets
    half the tiny head count, a full-attention head_dim of 512 beside a global 256 twice the
    tiny head_dim. Fields the tiny config leaves alone keep their value."""
    out = {}
    for index, entry in entries.items():
        if not isinstance(entry, dict):
            out[index] = entry
            continue
        shrunk = {}
        for attr, value in entry.items():
            before, after = present.get(attr), overrides.get(attr)
            if _is_int(value) and _is_int(before) and _is_int(after) and before > 0:
                value = max(1, round(value * after / before))
            shrunk[attr] = value
        out[index] = shrunk
    return out


def _attention_layer(
    default: Any, present: dict[str, Any], overrides: dict[str, Any], n: int
) -> dict[str, Any]:
    """A hybrid stack whose default layer kinds are linear attention only (Bamba, GraniteMoE-
    Hybrid: Mamba layers unless the config names attention layers) has attention layers in its
    real checkpoints, and its forward needs one (the cache's `get_seq_length` reads an attention
    layer). The tiny config makes its last layer full attention: through `layer_types` when that
    is a field, else through a list of layer indices that defaults to None and, when given,
    turns those layers to attention (`attn_layer_indices`)."""
    kinds = getattr(default, "layer_types", None)
    if not (isinstance(kinds, (list, tuple)) and kinds and set(kinds) == {"linear_attention"}):
        return {}
    if isinstance(present.get("layer_types"), list):
        return {"layer_types": ["linear_attention"] * (n - 1) + ["full_attention"]}
    for key, value in present.items():
        if value is None and "layer" in key and key.endswith(("indices", "idxs", "ids")):
            change = {key: [n - 1]}
            try:
                shown = getattr(type(default)(**{**overrides, **change}), "layer_types", None)
            except Exception:
                continue
            if isinstance(shown, (list, tuple)) and "full_attention" in shown:
                return change
    return {}


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expert_topk(present: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Top-k of the routing: at most TINY_TOPK and at most the tiny expert count. A top-k that
    defaults to None beside a routed expert count (DeepSeek-V2: `topk(k=None)`) gets TINY_TOPK."""
    counts = [overrides.get(k, present.get(k)) for k in _EXPERT_COUNTS if k in present]
    counts = [c for c in counts if _is_int(c)]
    counts = [c for c in counts if c > 0]
    if not counts:
        return {}
    cap = min([TINY_TOPK, *counts])
    out: dict[str, Any] = {}
    for key in _EXPERT_TOPK:
        if key not in present:
            continue
        value = present[key]
        if value is None:
            out[key] = cap
        elif _is_int(value):
            out[key] = min(value, cap)
        elif isinstance(value, list) and value and all(_is_int(v) for v in value):
            out[key] = [min(v, cap) for v in value]
    return out


# the routed experts' width, where a config names it apart from the dense MLP's
_EXPERT_WIDTHS = ("moe_intermediate_size", "expert_intermediate_size")


def _unset_experts(present: dict[str, Any]) -> dict[str, Any]:
    """An expert count the default config leaves None (Gemma 4 builds experts only under
    `enable_moe_block`, and sizes them by `num_experts` and `moe_intermediate_size`, both None by
    default) gets TINY_EXPERTS, and such an unset expert width FFN: a tiny config with the flag
    flipped then builds the experts (a variant the descriptor must group). The top-k follows
    (_expert_topk). A config that sets neither is left alone."""
    out: dict[str, Any] = {}
    for key in _EXPERT_COUNTS:
        if key in present and present[key] is None:
            out[key] = TINY_EXPERTS
    if out:
        out.update({k: FFN for k in _EXPERT_WIDTHS if k in present and present[k] is None})
    return out


def _mixer_heads(present: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A state-space mixer whose heads span the expanded hidden size (Mamba-2:
    `num_heads * head_dim == hidden_size * expand`, which Mamba2Config validates) keeps that
    product: heads of at most HEAD_DIM, as many as the tiny expanded width holds, and a group
    count that divides them."""
    hidden = next((present[k] for k in ("hidden_size", "d_model") if _is_int(present.get(k))), None)
    tiny_hidden = next((overrides[k] for k in ("hidden_size", "d_model") if k in overrides), None)
    if not hidden or not tiny_hidden:
        return {}
    ints = {k: v for k, v in present.items() if _is_int(v) and v > 0}
    heads = [k for k in ints if k.endswith("heads")]
    dims = [k for k in ints if "head" in k and not k.endswith("heads")]
    out: dict[str, Any] = {}
    for e in (k for k in ints if k.endswith("expand")):
        for h in heads:
            for d in dims:
                if ints[h] * ints[d] != hidden * ints[e]:
                    continue
                dim = overrides.get(d, ints[d])
                if d not in overrides and dim > HEAD_DIM:
                    dim = HEAD_DIM
                width = tiny_hidden * overrides.get(e, ints[e])
                if width % dim:
                    continue
                out[d], out[h] = dim, width // dim
                for g in (k for k in ints if k.endswith(("n_groups", "ngroups"))):
                    out[g] = math.gcd(overrides.get(g, ints[g]), out[h])
    return out


def tiny_overrides(default_config: Any) -> dict[str, Any]:
    """The keyword arguments that turn `type(default_config)()` into a tiny config."""
    present = default_config.to_dict()
    overrides: dict[str, Any] = {k: v for k, v in TINY_SIZES.items() if present.get(k) is not None}
    overrides.update(
        {k: v for k, v in TINY_CAPS.items() if _is_int(present.get(k)) and present[k] > v}
    )

    # layers and per-layer patterns
    count = _layer_count(present)
    lists_seen: set[str] = set()
    if count is not None:
        name, n = count
        lists, indices = _per_layer(present, n)
        tiny_n = max(_layers_needed(lists, indices, n), _periodic(present))
        for layer_field in LAYER_FIELDS:
            if isinstance(present.get(layer_field), int) and present[layer_field] == n:
                overrides[layer_field] = tiny_n
        lists_seen.update(lists)
        for key, value in lists.items():
            resized = _resized(value, tiny_n)
            if isinstance(present[key], dict):
                resized = {i: v for i, v in enumerate(resized) if v is not None}
            overrides[key] = resized
        for key, value in indices.items():
            marks = _resized([i in set(value) for i in range(n)], tiny_n)
            overrides[key] = [i for i, marked in enumerate(marks) if marked]
        overrides.update(_attention_layer(default_config, present, overrides, tiny_n))

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
        elif key.endswith(_HEAD_COUNT_LIKE) and value > HEADS:
            overrides[key] = max(1, round(value * HEADS / heads)) if _is_int(heads) else HEADS
        elif key.endswith(_RANK_LIKE) and value > 0 and isinstance(hidden, int):
            overrides[key] = _scaled(value, HIDDEN / hidden, minimum=8, multiple=8)
        elif key in _EXPERT_COUNTS and value > 0 and value != TINY_EXPERTS:
            # fewer too: one expert (HunYuan-MoE's default) routes nothing and has no smaller
            # count, so neither the routing nor an expert-count override could be checked
            overrides[key] = TINY_EXPERTS
        elif key in _EXPERT_GROUPS + _EXPERT_GROUP_TOPK and value > 1:
            overrides[key] = 1
        elif key.endswith(_VOCAB_LIKE) and value > VOCAB:
            overrides[key] = VOCAB
    overrides.update(_unset_experts(present))
    overrides.update(_expert_topk(present, overrides))
    overrides.update(_mixer_heads(present, overrides))
    overrides.update(_prefixed_kv_heads(present, overrides))  # after the head counts they divide

    # RoPE per-frequency lists follow the rotary width
    rope = present.get("rope_parameters")
    if ratio is not None and isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor", present.get("partial_rotary_factor")) or 1.0
        half = int(head_dim * partial) // 2
        tiny_half = int(HEAD_DIM * partial) // 2
        overrides["rope_parameters"] = _shrink_rope(rope, half, tiny_half)

    # per-layer config entries follow their global fields
    for key, value in present.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict) and key in lists_seen:
            overrides[key] = _shrink_layer_entries(overrides[key], present, overrides)

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
            overrides[key] = {**value.to_diff_dict(), **tiny_overrides(value)}
    return overrides


def _prefixed_kv_heads(present: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """KV heads of another set of layers (Inkling's `swa_num_key_value_heads` beside
    `swa_num_attention_heads` for its sliding-window layers) keep their attention's kind like
    `num_key_value_heads` does, against the head count of the same prefix: grouped stays
    grouped. Scaled like any other head count, 16 of 64 would become 1 of 4, a multi-query
    attention whose KV heads no smaller block config could resize."""
    out: dict[str, Any] = {}
    for key, kv in present.items():
        base = next((f for f in KV_HEAD_FIELDS if key.endswith("_" + f)), None)
        if base is None or not _is_int(kv) or kv <= 0:
            continue
        prefix = key[: -len(base)]
        heads = present.get(prefix + "num_attention_heads")
        if not _is_int(heads) or heads <= 0 or heads % kv:
            continue  # no head count of its own to keep a kind against
        tiny_heads = overrides.get(prefix + "num_attention_heads", heads)
        kind = tiny_heads if kv == heads else 1 if kv == 1 else KV_HEADS
        if _is_int(tiny_heads) and tiny_heads % kind == 0:
            out[key] = kind
    return out


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
