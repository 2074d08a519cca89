"""Sizes held in a sub-config of the text config (DBRX's `attn_config.kv_n_heads`,
`ffn_config.moe_num_experts`): read, named and written as dotted fields."""

from transformers import PretrainedConfig

from generator.heterogeneous import config_value, field_names, sub_configs
from generator.overrides import _through_sub_configs


def nested():
    config = PretrainedConfig(hidden_size=8, num_attention_heads=2)
    config.attn_config = PretrainedConfig(kv_n_heads=2)
    config.ffn_config = PretrainedConfig(ffn_hidden_size=16, moe_num_experts=4)
    return config


def test_a_sub_config_s_field_is_named_and_read_by_its_dotted_path():
    config = nested()
    assert sub_configs(config) == ("attn_config", "ffn_config")
    assert field_names(config, "moe_num_experts") == ("ffn_config.moe_num_experts",)
    assert field_names(config, "hidden_size") == ("hidden_size",)  # its own field first
    assert field_names(config, "absent") == ()
    assert config_value(config, "ffn_config.moe_num_experts") == 4
    assert config_value(config, "ffn_config.absent", "none") == "none"
    assert config_value(config, "nowhere.absent", "none") == "none"


def test_reads_through_a_sub_config_become_its_dotted_fields():
    """`attn_config = config.attn_config` (a sub-config read whole) reads each of its fields;
    `config.moe_num_experts` in a module built with `config.ffn_config` is that sub-config's.
    Without the rule no KV-head or expert-count candidate is read at all."""
    reads = {"attn_config": "a.py:1", "moe_num_experts": "a.py:2", "hidden_size": "a.py:3"}
    out = _through_sub_configs(reads, nested())
    assert out["attn_config.kv_n_heads"] == "a.py:1"
    assert out["ffn_config.moe_num_experts"] == "a.py:2"
    assert "moe_num_experts" not in out  # not a field of the text config itself
    assert out["hidden_size"] == "a.py:3"


def test_a_per_layer_field_counts_as_the_config_s_own():
    """A heterogeneous config refuses the global read of a per-layer field (hasattr raises):
    the field is still the config's own, not looked for in sub-configs."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        per_layer_config={1: {"num_key_value_heads": 1}},
    )
    assert field_names(config, "num_key_value_heads") == ("num_key_value_heads",)
    reads = {"num_key_value_heads": "a.py:1"}
    assert _through_sub_configs(reads, config) == reads
