"""The pruning layer descriptors of Model Optimizer's mixins, as inferred (names relative to
the decoder layer or to a subblock's module, with the evidence for the docstring), and the
check that every name is safe to render."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import PuzzleGenError
from ..spec import is_dotted_path


@dataclass(frozen=True)
class FFNLayer:
    down_proj_name: str  # relative to the decoder layer, e.g. mlp.down_proj
    ffn_prefix_name: str  # e.g. model.layers.{layer_idx}.mlp
    linear_weight_names: tuple[str, ...]  # relative to the FFN prefix
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class KVHeadsLayer:
    o_proj_name: str  # relative to the decoder layer, e.g. self_attn.o_proj
    attn_prefix_name: str  # e.g. model.layers.{layer_idx}.self_attn
    qkvo_weight_names: tuple[str, str, str, str]  # relative to the attention prefix, q, k, v, o
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertsLayer:
    """Model Optimizer's ExpertRemovalLayerDescriptor: names relative to the MoE module."""

    target_name: str  # the router, relative to the decoder layer (what the hooks watch)
    moe_prefix_name: str  # e.g. model.layers.{layer_idx}.mlp
    expert_prefix_name: str  # "experts.{expert_idx}" (per-expert) or "" (fused)
    router_weights: tuple[str, ...]
    router_biases: tuple[str, ...]
    expert_weights: tuple[str, ...]  # per-expert, relative to the expert prefix
    expert_biases: tuple[str, ...]
    is_fused_experts: bool
    fused_expert_weights: tuple[str, ...]  # fused, relative to the MoE prefix
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pruning:
    ffn: FFNLayer | None
    kv_heads: KVHeadsLayer | None
    ffn_reason: str  # why there is no FFN layer descriptor ("" when there is one)
    kv_reason: str
    experts: ExpertsLayer | None = None
    experts_reason: str = ""


def check_pruning_names(p: Pruning) -> None:
    for layer in (p.ffn, p.kv_heads, p.experts):
        if layer is None:
            continue
        for value in dataclasses.astuple(layer)[:-1]:
            if isinstance(value, bool):
                continue
            for item in value if isinstance(value, tuple) else (value,):
                if item == "":
                    continue
                plain = item.replace("{layer_idx}", "0").replace("{expert_idx}", "0")
                if not is_dotted_path(plain, allow_digits=True):
                    raise PuzzleGenError(f"refusing to render the module name {item!r}")
