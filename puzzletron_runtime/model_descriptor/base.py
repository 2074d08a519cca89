"""ModelDescriptor: what Puzzletron needs to know about one model family."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, Iterable

from torch import nn

from ..block_config import BlockConfig
from ..utils.dummy_modules import DummyBlock
from .weight_groups import group_names

__all__ = ["ModelDescriptor"]


class ModelDescriptor(ABC):
    """Describes a model family to Puzzletron.

    Subclasses are used as classes (every method is a static or class method): which classes
    are the decoder layers, how a BlockConfig maps onto a layer's config, how to make a subblock
    a no-op, how to rebuild buffers after a meta-device build, where the embeddings, final norm,
    LM head and layers live, and how checkpoint tensors group into subblocks.
    """

    # -- required -----------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def decoder_layer_cls() -> type[nn.Module] | list[type[nn.Module]]:
        """The decoder layer class (or classes) the patcher makes heterogeneous."""

    @staticmethod
    @abstractmethod
    def block_config_to_layer_overrides(block_config: BlockConfig) -> dict[str, Any]:
        """Config fields to set when building the layer of `block_config` (None: keep)."""

    @staticmethod
    @abstractmethod
    def init_rotary_embedding(model: nn.Module, runtime: Any) -> None:
        """Rebuild buffers that are not in the state dict (rotary frequencies) on
        `runtime.device` after a meta-device build."""

    @staticmethod
    @abstractmethod
    def input_embedding_name() -> str:
        """Module path of the input embedding."""

    @staticmethod
    @abstractmethod
    def output_embedding_name() -> str:
        """Module path of the output embedding (LM head)."""

    @staticmethod
    @abstractmethod
    def final_norm_name() -> str | None:
        """Module path of the final norm, or None for a model without one."""

    @staticmethod
    @abstractmethod
    def layer_block_name(index: int) -> str:
        """Module path of decoder layer `index`."""

    @staticmethod
    @abstractmethod
    def layer_name_predicates(num_layers: int) -> dict[str, re.Pattern]:
        """Group name -> regex over tensor names: `embeddings`, `lm_head`,
        `block_{i}_attention`, `block_{i}_ffn`."""

    # -- defaults -----------------------------------------------------------------------------
    @staticmethod
    def requires_trust_remote_code() -> bool:
        """Whether loading needs trust_remote_code=True (custom code through auto_map)."""
        return False

    @staticmethod
    def stages_need_token_ids() -> bool:
        """Whether the layers read an input the model computes from the token ids before its
        layer loop (Gemma 4's per-layer inputs), besides the hidden states: a pipeline stage
        without block 0 then keeps the input embedding (and the rest of the embeddings group)
        and is given the token ids as well as the previous stage's hidden states."""
        return False

    @staticmethod
    def uses_autocast() -> bool:
        """Whether the model runs correctly under torch.autocast."""
        return True

    @staticmethod
    def get_language_model_config(config: Any) -> Any:
        """The language-model part of `config` (the config itself unless nested)."""
        return config

    @staticmethod
    def attn_no_op_post_init(decoder_layer: nn.Module) -> None:
        """Make the attention subblock of a freshly built layer a no-op."""
        raise NotImplementedError

    @staticmethod
    def mlp_no_op_post_init(decoder_layer: nn.Module) -> None:
        """Make the FFN subblock of a freshly built layer a no-op."""
        raise NotImplementedError

    @classmethod
    def attn_no_op_supported(cls) -> bool:
        """True exactly when the subclass overrides attn_no_op_post_init."""
        return cls.attn_no_op_post_init is not ModelDescriptor.attn_no_op_post_init

    @classmethod
    def mlp_no_op_supported(cls) -> bool:
        """True exactly when the subclass overrides mlp_no_op_post_init."""
        return cls.mlp_no_op_post_init is not ModelDescriptor.mlp_no_op_post_init

    @classmethod
    def create_dummy_block(cls, original_layer: nn.Module, block_index: int) -> nn.Module:
        """A parameter-free block that passes its input through, for a layer another shard
        owns. Descriptors of models whose loop indexes a layer's output, or reads attributes of
        it, return a DummyBlock with returns_tuple / attributes."""
        return DummyBlock(block_index)

    @classmethod
    def get_weight_groups(
        cls, layer_names: Iterable[str], num_hidden_layers: int
    ) -> dict[str, list[str]]:
        """Group tensor names for subblock checkpointing.

        Each name goes into the first group (in predicate order) whose pattern matches; groups
        that receive no name are left out. The predicates are built once per call.
        Raises ValueError naming the first tensor no group matches.

        The names are read in one pass: each name is tried only against the patterns whose
        literal prefix starts it (see `weight_groups`), which gives the result of the rule
        above for any predicates; predicates that are not compiled regexes are applied name
        by name.
        """
        predicates = list(cls.layer_name_predicates(num_hidden_layers).items())
        return group_names(predicates, layer_names, cls.__name__)
