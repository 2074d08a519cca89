"""Configs with per-layer values (transformers' `per_layer_config`): a per-layer field is never
read on the whole model, and never taken for a block-config size."""

import pytest
from transformers import LlamaConfig

from generator.heterogeneous import config_value, per_layer_fields
from generator.overrides import _fewer_heads
from generator.source import resolve
from generator.tiny import tiny_config
from generator.verify.oracle import Reference


def heterogeneous(**per_layer):
    return LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        per_layer_config={1: per_layer},
    )


def test_a_per_layer_field_reads_as_absent_and_the_others_as_usual():
    config = heterogeneous(num_key_value_heads=1)
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        config.num_key_value_heads  # noqa: B018 - transformers refuses the global read
    assert per_layer_fields(config) == {"num_key_value_heads"}
    assert config_value(config, "num_key_value_heads", "absent") == "absent"
    assert config_value(config, "intermediate_size") == 128
    plain = LlamaConfig(num_key_value_heads=2)
    assert per_layer_fields(plain) == frozenset()
    assert config_value(plain, "num_key_value_heads") == 2


def test_the_oracle_and_the_kv_head_candidates_read_no_per_layer_field_of_dots3_note():
    """Dots 3 Note's sliding layers have their own heads and ranks (per_layer_config)."""
    config = tiny_config(resolve("dots3_note_text").config_cls)
    assert {"num_attention_heads", "num_key_value_heads"} <= per_layer_fields(config)
    # the attention's head count differs per layer: no one smaller KV-head count to try
    assert _fewer_heads(2, config) is None
    assert _fewer_heads(2, heterogeneous(intermediate_size=64)) == 1
    sizes = Reference(config).size_fields
    assert "attention.num_key_value_heads" not in sizes
    assert sizes["ffn.moe.expert_intermediate_dim"].field == "moe_intermediate_size"
