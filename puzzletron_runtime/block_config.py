"""Per-layer block configs: what one decoder layer of a heterogeneous model looks like.

Frozen dataclasses, built from the dicts found in a config.json's `block_configs` and turned
back into them by `to_dict()`. Contradictory or missing values raise ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "FFNConfig",
    "MambaConfig",
    "MoEConfig",
    "maybe_cast_block_configs",
]


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _positive_int(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts sizes of one FFN subblock."""

    num_local_experts: int
    num_experts_per_tok: int
    expert_intermediate_dim: int
    shared_expert_intermediate_dim: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _positive_int(getattr(self, f.name), f"ffn.moe.{f.name}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"ffn.moe.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"ffn.moe.num_local_experts ({self.num_local_experts})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoEConfig":
        _check_keys(cls, data, "ffn.moe")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in data
        ]
        if missing:
            raise ValueError(f"ffn.moe: missing field(s) {', '.join(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class MambaConfig:
    """A Mamba (state-space) mixer in the attention subblock's place, as Model Optimizer
    describes one: state size, heads, head width and groups (None: the model's own value)."""

    state_dim: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    num_groups: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _positive_int(getattr(self, f.name), f"attention.mamba.{f.name}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MambaConfig":
        _check_keys(cls, data, "attention.mamba")
        return cls(**data)


@dataclass(frozen=True)
class AttentionConfig:
    """The attention subblock of one layer: a no-op, attention with this many KV heads, or a
    Mamba mixer (`mamba`) in its place."""

    no_op: bool = False
    num_key_value_heads: int | None = None
    mamba: MambaConfig | None = None

    def __post_init__(self) -> None:
        _bool(self.no_op, "attention.no_op")
        if isinstance(self.mamba, Mapping):
            object.__setattr__(self, "mamba", MambaConfig.from_dict(self.mamba))
        if self.no_op:
            object.__setattr__(self, "num_key_value_heads", None)
            object.__setattr__(self, "mamba", None)
            return
        if self.mamba is not None and not isinstance(self.mamba, MambaConfig):
            raise ValueError(
                f"attention.mamba must be a MambaConfig or a mapping, got {self.mamba!r}"
            )
        if self.num_key_value_heads is None and self.mamba is None:
            raise ValueError(
                "attention.num_key_value_heads is required unless attention.no_op or "
                "attention.mamba"
            )
        _positive_int(self.num_key_value_heads, "attention.num_key_value_heads")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AttentionConfig":
        _check_keys(cls, data, "attention")
        return cls(**data)


@dataclass(frozen=True)
class FFNConfig:
    """The FFN subblock of one layer: a no-op, a dense MLP of a width, or a mixture of experts."""

    no_op: bool = False
    intermediate_size: int | None = None
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        _bool(self.no_op, "ffn.no_op")
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if self.no_op:
            object.__setattr__(self, "intermediate_size", None)
            object.__setattr__(self, "moe", None)
            return
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"ffn.moe must be a MoEConfig or a mapping, got {self.moe!r}")
        if self.intermediate_size is None and self.moe is None:
            raise ValueError("ffn.intermediate_size is required unless ffn.no_op or ffn.moe")
        _positive_int(self.intermediate_size, "ffn.intermediate_size")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FFNConfig":
        _check_keys(cls, data, "ffn")
        return cls(**data)


@dataclass(frozen=True)
class BlockConfig:
    """One decoder layer: its attention and FFN subblocks."""

    attention: AttentionConfig
    ffn: FFNConfig

    def __post_init__(self) -> None:
        if isinstance(self.attention, Mapping):
            object.__setattr__(self, "attention", AttentionConfig.from_dict(self.attention))
        if isinstance(self.ffn, Mapping):
            object.__setattr__(self, "ffn", FFNConfig.from_dict(self.ffn))
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(
                f"attention must be an AttentionConfig or a mapping, got {self.attention!r}"
            )
        if not isinstance(self.ffn, FFNConfig):
            raise ValueError(f"ffn must be an FFNConfig or a mapping, got {self.ffn!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockConfig":
        _check_keys(cls, data, "block config")
        missing = [name for name in ("attention", "ffn") if name not in data]
        if missing:
            raise ValueError(f"block config: missing field(s) {', '.join(missing)}")
        return cls(attention=data["attention"], ffn=data["ffn"])

    def to_dict(self) -> dict[str, Any]:
        """The config.json form; `BlockConfig.from_dict(b.to_dict()) == b`."""
        return dataclasses.asdict(self)


def maybe_cast_block_configs(
    block_configs: list[BlockConfig | Mapping[str, Any]] | None,
) -> list[BlockConfig] | None:
    """Turn a list of dicts (from config.json) or BlockConfigs into BlockConfigs; None stays."""
    if block_configs is None:
        return None
    out = []
    for i, item in enumerate(block_configs):
        if isinstance(item, BlockConfig):
            out.append(item)
            continue
        try:
            out.append(BlockConfig.from_dict(item))
        except ValueError as exc:
            raise ValueError(f"block_configs[{i}]: {exc}") from None
    return out
