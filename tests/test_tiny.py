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


# -- mixture-of-experts, hybrid and multimodal configs ------------------------------------------


def params(model_type, config) -> int:
    with quiet_transformers():
        model = build_model(resolve(model_type).causal_lm_cls, config, "meta")
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "model_type, field, count",
    [
        ("ernie4_5_moe", "moe_k", "moe_num_experts"),  # 6 of 64 by default
        ("kimi_linear", "num_experts_per_token", "num_experts"),  # 8 of 256
        ("bailing_hybrid", "num_experts_per_token", "num_experts"),  # 8 of 512
    ],
)
def test_routing_top_k_fits_the_tiny_expert_count(model_type, field, count):
    config = tiny(model_type)
    assert 0 < getattr(config, field) <= min(2, getattr(config, count))
    runs(model_type, config)  # a top-k over fewer experts: "selected index k out of range"


def test_a_single_default_expert_becomes_several():
    default = resolve("hunyuan_v1_moe").config_cls()
    assert default.num_experts == 1  # one expert: nothing to route between, no smaller count
    config = tiny("hunyuan_v1_moe", head_dim=HEAD_DIM)
    assert config.num_experts == 4 and config.moe_topk == 1
    runs("hunyuan_v1_moe", config)


def test_a_top_k_left_none_beside_routed_experts_gets_a_number():
    default = resolve("deepseek_v2").config_cls()
    assert default.num_experts_per_tok is None and default.n_routed_experts > 0
    config = tiny("deepseek_v2")
    assert config.num_experts_per_tok == 2
    runs("deepseek_v2", config)  # topk(k=None) fails


def test_expert_fields_left_unset_get_tiny_values():
    """Gemma 4 builds experts only under enable_moe_block and leaves their count, top-k and
    width None: the tiny config sets them, so a variant with the flag flipped builds."""
    from transformers import PretrainedConfig

    class Unset(PretrainedConfig):
        model_type = "unset-experts-test"

        def __init__(self, num_experts=None, top_k_experts=None, moe_intermediate_size=None, **kw):
            self.hidden_size = 256
            self.intermediate_size = 1024
            self.num_experts = num_experts
            self.top_k_experts = top_k_experts
            self.moe_intermediate_size = moe_intermediate_size
            super().__init__(**kw)

    overrides = tiny_overrides(Unset())
    assert overrides["num_experts"] == 4
    assert overrides["top_k_experts"] == 2
    assert overrides["moe_intermediate_size"] == overrides["intermediate_size"]

    class NoExperts(PretrainedConfig):
        model_type = "no-experts-test"

        def __init__(self, **kw):
            self.hidden_size = 256
            self.moe_intermediate_size = None
            super().__init__(**kw)

    assert "moe_intermediate_size" not in tiny_overrides(NoExperts())


def test_top_k_rule_on_a_synthetic_config():
    from transformers import PretrainedConfig

    class Routed(PretrainedConfig):
        model_type = "routed-test"

        def __init__(self, n_routed_experts=64, moe_topk=None, num_experts_per_tok=8, **kw):
            self.n_routed_experts = n_routed_experts
            self.moe_topk = moe_topk
            self.num_experts_per_tok = num_experts_per_tok
            super().__init__(**kw)

    overrides = tiny_overrides(Routed(moe_topk=[8, 1, 6]))
    assert overrides["n_routed_experts"] == 4
    assert overrides["num_experts_per_tok"] == 2
    assert overrides["moe_topk"] == [2, 1, 2]  # one per layer, each capped
    # a single expert routes nothing and has no smaller count to check: it gets the tiny four
    single = tiny_overrides(Routed(n_routed_experts=1))
    assert (single["n_routed_experts"], single["num_experts_per_tok"]) == (4, 2)
    assert tiny_overrides(Routed())["moe_topk"] == 2  # None beside routed experts
    assert "moe_topk" not in tiny_overrides(Routed(n_routed_experts=0))  # no experts: leave it


def test_mamba2_heads_span_the_expanded_width():
    default = resolve("mamba2").config_cls()
    assert default.num_heads * default.head_dim == default.hidden_size * default.expand
    config = tiny("mamba2")  # Mamba2Config validates the product
    assert config.num_heads * config.head_dim == config.hidden_size * config.expand
    assert config.num_heads % config.n_groups == 0
    runs("mamba2", config)


@pytest.mark.parametrize(
    "model_type, heads, head_dim, expand",
    [
        ("bamba", "mamba_n_heads", "mamba_d_head", "mamba_expand"),
        ("nemotron_h", "mamba_num_heads", "mamba_head_dim", "expand"),
    ],
)
def test_mixer_heads_keep_their_product_under_other_names(model_type, heads, head_dim, expand):
    config = tiny(model_type)
    width = config.hidden_size * getattr(config, expand)
    assert getattr(config, heads) * getattr(config, head_dim) == width
    # a few heads of at most HEAD_DIM, not 128 heads of width 1 (what Bamba's config derives)
    assert 8 <= getattr(config, head_dim) <= HEAD_DIM


@pytest.mark.parametrize(
    "model_type, field", [("bamba", "attn_layer_indices"), ("granitemoehybrid", "layer_types")]
)
def test_a_stack_of_linear_layers_by_default_gets_an_attention_layer(model_type, field):
    default = resolve(model_type).config_cls()
    assert set(default.layer_types) == {"linear_attention"}  # Mamba only, by default
    config = tiny(model_type)
    assert set(config.layer_types) == {"linear_attention", "full_attention"}
    assert config.layer_types[0] == "linear_attention"
    # the forward reads the sequence length off an attention layer of the cache
    runs(model_type, config)


def test_per_layer_config_is_cut_to_the_tiny_stack_and_shrunk():
    config = tiny("gemma4_text")
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert full == [config.num_hidden_layers - 1]
    # full-attention layers have twice the head_dim of the others, by default and when tiny
    assert config.per_layer_config[full[0]].head_dim == 2 * HEAD_DIM
    assert config.per_layer_config[0].head_dim == HEAD_DIM
    runs("gemma4_text", config)


@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_unified"])
def test_nested_per_layer_config_builds(model_type):
    # the nested text config passes back its per_layer_config; its keys must fit the tiny stack
    runs(model_type, tiny(model_type))


def test_heterogeneous_layers_stay_heterogeneous_and_tiny():
    default = resolve("dots3_note_text").config_cls()
    config = tiny("dots3_note_text")
    sliding = config.layer_types.index("sliding_attention")
    indexed = config.layer_types.index("indexed_attention")
    layer = config.per_layer_config
    for attr in ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim"):
        wide, narrow = default.per_layer_config[sliding], default.per_layer_config[indexed]
        assert getattr(wide, attr) != getattr(narrow, attr)  # the default's layers differ
        assert getattr(layer[sliding], attr) != getattr(layer[indexed], attr)  # so do the tiny's
    assert layer[sliding].num_attention_heads < 8
    assert params("dots3_note_text", config) < 2_000_000  # 78 million with the default's entries


@pytest.mark.parametrize(
    "model_type, field",
    [("blt", "encoder_hash_byte_group_vocab"), ("gemma4_text", "vocab_size_per_layer_input")],
)
def test_other_vocabularies_are_tiny(model_type, field):
    assert getattr(tiny(model_type), field) <= 256
    assert params(model_type, tiny(model_type)) < 2_000_000  # hundreds of millions before


def test_widths_shared_with_another_sub_config_follow_the_tiny_hidden_size():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with quiet_transformers():
        config = tiny_config(Qwen3VLConfig)
        model = build_model(Qwen3VLForConditionalGeneration, config, "meta")
    # the vision merger's output replaces image tokens in the language model's embeddings
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert model.model.visual.merger.linear_fc2.out_features == config.text_config.hidden_size
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    blt = tiny("blt")
    assert blt.encoder_config.hidden_size_global == blt.global_config.hidden_size
    runs("blt", blt)


@pytest.mark.parametrize("model_type", ["nemotron_h", "granitemoehybrid", "longcat_flash"])
def test_expert_widths_are_capped(model_type):
    assert params(model_type, tiny(model_type)) < 1_000_000


def test_capped_widths_stay_off_where_the_default_has_none():
    default = resolve("granitemoeshared").config_cls()
    assert tiny("granitemoeshared").shared_intermediate_size == min(
        default.shared_intermediate_size, 64
    )


@pytest.mark.parametrize("model_type", ["blt", "zamba"])
def test_tiny_only_fixups_are_needed(model_type, monkeypatch):
    """A fix-up that changes only the tiny config: without it the tiny model fails."""
    source = resolve(model_type)
    monkeypatch.delitem(FIXUPS, model_type)
    with pytest.raises(Exception):
        with quiet_transformers():
            config = tiny_config(source.config_cls)
        runs(model_type, config)


def test_a_sub_config_gets_only_the_fields_its_class_would_not_set_itself():
    """transformers 5.14's DBRX sub-configs refuse keyword arguments they do not know, and a
    sub-config's full `to_dict()` carries the base class's (`_name_or_path`,
    `output_attentions`): the tiny config passes each nested config only what differs from
    its class's defaults, shrunk."""
    from transformers import PretrainedConfig

    class StrictInner(PretrainedConfig):
        model_type = "strict_inner"

        def __init__(self, hidden_size=4096, clip_qkv=8.0, **kwargs):
            unknown = set(kwargs) - {"model_type", "transformers_version"}
            if unknown:
                raise ValueError(f"unknown {sorted(unknown)}")
            self.hidden_size, self.clip_qkv = hidden_size, clip_qkv
            super().__init__()

    class Outer(PretrainedConfig):
        model_type = "strict_outer"
        sub_configs = {"inner": StrictInner}

        def __init__(self, inner=None, hidden_size=4096, **kwargs):
            self.inner = StrictInner(**inner) if isinstance(inner, dict) else StrictInner()
            self.hidden_size = hidden_size
            super().__init__(**kwargs)

    config = tiny_config(Outer)
    assert config.inner.hidden_size == config.hidden_size < 4096
    assert config.inner.clip_qkv == 8.0  # a default of the class: left to it
