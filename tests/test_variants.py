"""Config variants: one descriptor serves every config of its model type.

Modules that other config values add are grouped too (OPT's project_in / project_out), and an
override whose config field the model transforms before use maps the block config's width to
the real width (LFM2's 2/3 auto-adjusted FFN) or is refused.
"""

import synthetic_models as sm

from generator import predicates
from generator.analysis import model_structure
from generator.analysis.source_index import SourceIndex
from generator.infer import infer
from generator.probe import build_model, quiet_transformers
from generator.source import resolve
from generator.tiny import tiny_config


def test_modules_built_on_an_untaken_branch_are_found():
    """Without the rule the loop analysis sees only the probed children: no projections."""
    model = sm.OptionalProjectionModel(sm.make_config())
    assert model.project_in is None
    optional = model_structure.optional_modules(SourceIndex(), type(model), model)
    assert set(optional) == {"project_in", "project_out"}
    children = {n for n, _ in model.named_children()}
    loop = model_structure.analyze_loop(
        SourceIndex(), type(model), "layers", children, frozenset(optional)
    )
    assert loop.before_loop == ["embed_tokens", "project_in"]
    assert loop.final_norm == "final_layer_norm"
    assert loop.after_loop == ["project_out"]


def test_present_modules_are_not_optional():
    model = sm.OptionalProjectionModel(sm.make_config(word_embed_proj_dim=4))
    assert model_structure.optional_modules(SourceIndex(), type(model), model) == {}


def test_opt_groups_the_projections_of_350m_style_configs():
    spec = infer("opt")
    config_cls = resolve("opt").config_cls
    with quiet_transformers():
        config = tiny_config(config_cls, word_embed_proj_dim=32)
    model = build_model(resolve("opt").causal_lm_cls, config)
    keys = list(model.state_dict())
    assert any("project_in" in k for k in keys) and any("project_out" in k for k in keys)
    predicates.validate(spec.predicates, keys, config.num_hidden_layers, "OPT-350m-style")
    groups = predicates.compile_groups(spec.predicates, config.num_hidden_layers)
    assert groups["embeddings"].match("model.decoder.project_in.weight")
    assert groups["lm_head"].match("model.decoder.project_out.weight")


def test_transformed_width_is_mapped_through_the_flag_that_disables_it():
    """LFM2 scales intermediate_size by 2/3 and rounds it up to a multiple of 256 unless
    block_auto_adjust_ff_dim is off: the override search finds that flag, so the block config's
    width is the built width. (LFM2 itself is refused for its conv layers; see below.)"""
    from types import SimpleNamespace

    from generator import overrides
    from generator.probe import Probe

    probe = Probe(resolve("lfm2"))
    layer = probe.module("model.layers.0")
    sb = SimpleNamespace(members=["ffn_norm", "feed_forward"], cores=["feed_forward"], judges=[])
    reads = overrides._reads(SourceIndex(), overrides._subblock_classes(layer, sb.members))
    facts = []
    ctx = SimpleNamespace(probe=probe, fact=lambda *args: facts.append(args))
    run = overrides._Run(ctx, "ffn", sb, reads, "model.layers.0")
    plain = probe.shape_diff({"intermediate_size": 280}, "model.layers.0")
    assert not any(280 in shape for shape in plain.values())  # rounded to 256 either way
    assert run._verbatim_flag("intermediate_size", 280) == ("block_auto_adjust_ff_dim", False)
    run.widths(experts=set())
    (o,) = run.found
    assert (o.config_field, o.block_config_attr, o.with_flag, o.flag_value) == (
        "intermediate_size",
        "ffn.intermediate_size",
        "block_auto_adjust_ff_dim",
        False,
    )


def test_layer_children_other_configs_add_are_grouped_by_their_data_flow():
    """Falcon-40B-style configs (new_decoder_architecture) have ln_attn / ln_mlp, sequential
    ones a post_attention_layernorm; the descriptor from the default config groups them all."""
    spec = infer("falcon")
    (kind,) = spec.kinds
    assert "ln_attn" in kind.attention.weight_modules
    assert {"ln_mlp", "post_attention_layernorm"} <= set(kind.ffn.weight_modules)
    source = resolve("falcon")
    for variant in ({"new_decoder_architecture": True}, {"parallel_attn": False}):
        with quiet_transformers():
            config = tiny_config(source.config_cls, **variant)
        keys = list(build_model(source.causal_lm_cls, config).state_dict())
        predicates.validate(spec.predicates, keys, config.num_hidden_layers, str(variant))


def test_cross_attention_only_an_encoder_input_reaches_is_not_grouped():
    spec = infer("gpt2")
    fact = spec.fact("crossattention (other configs)")
    assert fact.value == "not grouped"
    assert "encoder_hidden_states" in " ".join(fact.evidence)


def test_plain_width_needs_no_flag():
    (o,) = [o for o in infer("llama").overrides if o.block_config_attr.startswith("ffn.")]
    assert o.with_flag is None


def test_checkpoint_names_join_the_group_of_the_module_they_load_into():
    """save_pretrained writes legacy names (GPT-NeoX's `embed_out`, Mixtral's per-expert
    `block_sparse_moe`); the predicates must partition those too, the way Model Optimizer's
    converter calls get_weight_groups on a checkpoint's names."""
    import pytest

    from generator.errors import InferenceError

    pred = predicates.build(
        ["model.embed_tokens"], ["model.norm", "lm_head"], "model.layers", ["attn"], ["mlp"]
    )
    disk = {
        "embed_out.weight": "lm_head.weight",
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": "model.layers.0.mlp.experts.up",
        "model.layers.1.block_sparse_moe.gate.weight": "model.layers.1.mlp.gate.weight",
        "model.layers.0.attn.q.weight": "model.layers.0.attn.q.weight",
    }
    with pytest.raises(InferenceError, match="embed_out.weight"):
        predicates.validate(pred, disk, 2, "checkpoint names")
    extended, evidence = predicates.with_checkpoint_names(pred, disk, 2)
    predicates.validate(extended, disk, 2, "checkpoint names")
    predicates.validate(extended, disk.values(), 2, "module names")
    groups = predicates.compile_groups(extended, 2)
    assert groups["lm_head"].match("embed_out.weight")
    assert groups["block_1_ffn"].match("model.layers.1.block_sparse_moe.experts.7.w2.weight")
    assert len(evidence) == 2
    with pytest.raises(InferenceError, match="no group"):
        predicates.with_checkpoint_names(pred, {"x.weight": "nowhere.weight"}, 2)


def test_a_child_on_disk_holding_tensors_of_both_subblocks_is_split_deeper():
    """HY-V4 writes `hc_pre.hc_attn_layer.*` for `attn_hc.*` (attention) and
    `hc_pre.hc_mlp_layer.*` for `ffn_hc.*` (FFN): `hc_pre` as a whole belongs to neither."""
    pred = predicates.build(
        ["model.embed_tokens"], ["lm_head"], "model.layers", ["attn_hc", "attn"], ["ffn_hc", "mlp"]
    )
    disk = {}
    for i in range(2):
        disk[f"model.layers.{i}.hc_pre.hc_attn_layer.hc_fn"] = f"model.layers.{i}.attn_hc.fn"
        disk[f"model.layers.{i}.hc_pre.hc_mlp_layer.hc_fn"] = f"model.layers.{i}.ffn_hc.fn"
    extended, _ = predicates.with_checkpoint_names(pred, disk, 2)
    groups = predicates.compile_groups(extended, 2)
    for i in range(2):
        (hit,) = [
            g for g, p in groups.items() if p.match(f"model.layers.{i}.hc_pre.hc_mlp_layer.hc_fn")
        ]
        assert hit == f"block_{i}_ffn"
        (hit,) = [
            g for g, p in groups.items() if p.match(f"model.layers.{i}.hc_pre.hc_attn_layer.hc_fn")
        ]
        assert hit == f"block_{i}_attention"


def test_gpt_neox_groups_its_head_by_its_name_on_disk():
    spec = infer("gpt_neox")
    groups = predicates.compile_groups(spec.predicates, 2)
    assert groups["lm_head"].match("embed_out.weight")
    assert groups["lm_head"].match("lm_head.weight")


def test_width_the_model_multiplies_is_refused_with_the_reason():
    """GPT-NeoX-Japanese's FFN width is hidden_size x intermediate_multiple_size: no field holds
    the width, so no override is emitted, and the spec says why."""
    spec = infer("gpt_neox_japanese")
    assert [o for o in spec.overrides if o.block_config_attr.startswith("ffn.")] == []
    fact = spec.fact("ffn override (ffn.intermediate_size)")
    assert fact.value == "none"
    assert any("intermediate_multiple_size is transformed before use" in e for e in fact.evidence)


def test_weights_in_some_layers_only_and_a_head_beside_the_base_model():
    """ModernBERT-decoder: layer 0's attn_norm is an Identity, the others' a LayerNorm (weights
    anywhere in the stack count); its prediction head sits beside the base model and runs
    before the decoder projection (grouped with lm_head)."""
    spec = infer("modernbert-decoder")
    assert "attn_norm" in spec.kinds[0].attention.weight_modules
    groups = predicates.compile_groups(spec.predicates, 4)
    assert groups["block_3_attention"].match("model.layers.3.attn_norm.weight")
    assert groups["lm_head"].match("lm_head.dense.weight")
    assert groups["lm_head"].match("decoder.weight")


def test_reading_checkpoint_names_leaves_the_model_config_alone():
    """save_pretrained writes into the config it saves (dtype becomes a string); Apertus builds
    an activation from config.dtype, so later probe builds from that config would fail."""
    from generator.probe import Probe

    probe = Probe(resolve("apertus"))
    tiny = probe.tiny_model()
    before = tiny.config.dtype
    probe.checkpoint_names(tiny)
    assert tiny.config.dtype == before and not isinstance(tiny.config.dtype, str)
    build_model(type(tiny), tiny.config)


def test_experts_other_configs_add_beside_the_mlp_are_cores_of_the_ffn_subblock():
    """Gemma 4 with enable_moe_block runs routed experts beside its MLP, in the same FFN
    segment: the experts are a second FFN core (zeros on a no-op), the router a member whose
    call site unpacks three values. Before the rule, a variant child that is a core stopped
    generation. The generated no-ops then make a layer of such a config the identity."""
    import generated
    import torch
    from generator.probe import build_model

    spec = infer("gemma4_text")
    plan = {r.attr: r for r in spec.kinds[0].ffn.replacements}
    assert (plan["experts"].replacement, plan["experts"].tuple_size) == ("MatchingZeros", None)
    assert (plan["router"].replacement, plan["router"].tuple_size) == ("Same", 3)
    source = resolve("gemma4_text")
    with quiet_transformers():
        config = tiny_config(source.config_cls, enable_moe_block=True)
    torch.manual_seed(0)
    model = build_model(source.causal_lm_cls, config, device="cpu")
    keys = list(model.state_dict())
    assert any(".experts." in k for k in keys)
    predicates.validate(spec.predicates, keys, config.num_hidden_layers, "enable_moe_block")
    descriptor = generated.get_descriptor("gemma4_text")
    layer = model.model.layers[0]
    descriptor.attn_no_op_post_init(layer)
    descriptor.mlp_no_op_post_init(layer)
    assert not any(True for _ in layer.parameters())
    seen = {}
    layer.register_forward_hook(
        lambda _m, args, _k, out: seen.update(x=args[0], y=out), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=torch.arange(6).unsqueeze(0))
    assert torch.equal(seen["x"], seen["y"])
