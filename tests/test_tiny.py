"""The tiny-config synthesiser: small, but structurally faithful to the default config."""

import pytest
import torch

from generator.probe import build_model, quiet_transformers
from generator.source import resolve
from generator.tiny import FIXUPS, HEAD_DIM, HEADS, default_config, tiny_config, tiny_overrides


def tiny(model_type, **extra):
    with quiet_transformers():
        return tiny_config(resolve(model_type).config_cls, **extra)


def runs(model_type, config) -> None:
    source = resolve(model_type)
    torch.manual_seed(0)
    model = build_model(source.causal_lm_cls, config, "cpu")
    vocab = config.get_text_config().vocab_size
    with torch.no_grad():
        model(input_ids=torch.arange(8).unsqueeze(0) % vocab)


def test_every_layer_kind_of_a_pattern_is_kept():
    default = resolve("gemma3_text").config_cls()
    config = tiny("gemma3_text")
    # five sliding layers then a full one: six layers show both kinds
    assert (
        set(config.layer_types)
        == set(default.layer_types)
        == {
            "sliding_attention",
            "full_attention",
        }
    )
    assert config.num_hidden_layers == len(config.layer_types) == 6
    assert config.layer_types == default.layer_types[:6]


def test_small_stacks_grow_to_four_layers_repeating_their_pattern():
    config = tiny("bloom")  # two layers by default
    assert config.n_layer == 4


def test_pattern_derived_from_another_field_uses_the_fixup():
    config = tiny("gpt_neo")
    assert config.num_layers == len(config.attention_layers) == 4
    assert set(config.attention_layers) == {"global", "local"}
    runs("gpt_neo", config)


@pytest.mark.parametrize(
    "model_type, field, expected",
    [
        ("gptj", "rotary_dim", 4),  # 64 of 256: a quarter of the head, as by default
        ("minicpm3", "qk_rope_head_dim", 16),  # 32 of head_dim 32
        ("minicpm3", "qk_nope_head_dim", 32),
    ],
)
def test_head_dimension_fields_keep_their_ratio(model_type, field, expected):
    config = tiny(model_type)
    assert getattr(config, field) == expected
    runs(model_type, config)


def test_split_head_dims_stay_consistent():
    config = tiny("minicpm3")
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim


@pytest.mark.parametrize(
    "model_type, field, expected",
    [
        ("llama", "num_key_value_heads", HEADS),  # MHA by default stays MHA
        ("mistral", "num_key_value_heads", 2),  # GQA stays GQA
        ("falcon", "num_kv_heads", HEADS),
    ],
)
def test_kv_heads_keep_the_attention_kind(model_type, field, expected):
    assert getattr(tiny(model_type), field) == expected


def test_head_counts_and_head_dim_agree():
    config = tiny("gemma")
    assert config.num_attention_heads * config.head_dim == HEADS * HEAD_DIM
    assert config.hidden_size == 64


def test_token_ids_fall_inside_the_tiny_vocabulary():
    config = tiny("gemma3_text")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(config, name)
        for i in ids if isinstance(ids, list) else [ids]:
            assert i is None or 0 <= i < config.vocab_size, name


@pytest.mark.parametrize("model_type", ["gemma", "llama", "gpt2"])
def test_tied_embeddings_as_the_model_defines_them(model_type):
    default = resolve(model_type).config_cls()
    assert tiny(model_type).tie_word_embeddings == default.tie_word_embeddings
    assert tiny(model_type, tie_word_embeddings=True).tie_word_embeddings is True


def test_longrope_factors_follow_the_rotary_width():
    cls = resolve("phi3").config_cls
    half = 3072 // 32 // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * half,
        "long_factor": [2.0] * half,
        "original_max_position_embeddings": 4096,
    }
    with quiet_transformers():
        default = cls(rope_parameters=rope)
        config = cls(**{**default.to_dict(), **tiny_overrides(default)})
    params = config.rope_parameters
    assert len(params["short_factor"]) == len(params["long_factor"]) == HEAD_DIM // 2
    runs("phi3", config)


def test_nested_text_config_is_shrunk():
    config = tiny("gemma3")
    text = config.get_text_config()
    assert text.hidden_size == 64 and text.vocab_size == 256
    assert text.num_hidden_layers == len(text.layer_types)


@pytest.mark.parametrize("model_type", sorted(FIXUPS))
def test_fixups_make_the_type_build_and_run(model_type):
    """Each fix-up is needed (the plain default does not give a working tiny model) and
    sufficient (default at full size builds on the meta device; the tiny one runs)."""
    source = resolve(model_type)
    fixup = FIXUPS[model_type]
    assert fixup.reason
    with quiet_transformers():
        build_model(source.causal_lm_cls, default_config(source.config_cls), "meta")
    runs(model_type, tiny(model_type))
    if fixup.build:
        with pytest.raises(Exception), quiet_transformers():
            build_model(source.causal_lm_cls, source.config_cls(), "meta")
