"""The Model Optimizer target, its layout, converters and pruning layer descriptors, in the main
environment (our transformers, no modelopt installed). What needs Model Optimizer itself is in
tests/test_modelopt_api.py (`make test-modelopt`).

The converter check: block configs from `create_block_configs_from_main_config(config)`, fed
back through the descriptor's overrides with `deci_x_patcher`, build a model whose every tensor
name and shape equals the model transformers builds from `config` unpatched.
"""

import ast
import dataclasses
import importlib
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

import generated
from generator import kinds, modelopt, render
from generator.cli import main
from generator.errors import PuzzleGenError
from generator.infer import infer
from generator.probe import build_model, quiet_transformers
from generator.source import resolve
from generator.heterogeneous import config_value
from generator.tiny import default_config, tiny_config
from puzzletron_runtime import deci_x_patcher
from puzzletron_runtime.block_config import BlockConfig
from puzzletron_runtime.puzzformer.patcher import set_config_field

ROOT = Path(__file__).resolve().parent.parent
_COVERAGE = json.loads((ROOT / "generated" / "coverage.json").read_text())["types"]
VERIFIED = sorted(t for t, row in _COVERAGE.items() if row["status"] == "verified")
BY_TYPE = [pytest.param(t, marks=pytest.mark.xdist_group(f"type-{t}"), id=t) for t in VERIFIED]
NO_PRUNING = modelopt.Pruning(None, None, "not traced here", "not traced here")


@lru_cache(maxsize=None)
def spec_of(model_type):
    return infer(model_type)


def converter_of(model_type):
    package, _ = generated._DESCRIPTORS[model_type]
    module = importlib.import_module(f"generated.{package}.{package}_converter")
    (name,) = module.__all__
    return getattr(module, name)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rebuilt_shapes(model_type, config, block_configs, device):
    descriptor = generated.get_descriptor(model_type)
    with deci_x_patcher(descriptor, block_configs):
        return shapes(build_model(resolve(model_type).causal_lm_cls, config, device))


def configs(model_type):
    """A tiny config (KV heads below the head count where the type has them, so a converter
    reading the wrong field fails) and the default-size one, both built on the meta device.
    A default config that routes each token to None experts (DeepSeek-V2's
    num_experts_per_tok) builds no model that runs: only the tiny one, whose synthesiser sets
    a top-k, is checked then."""
    from generator.overrides import TOP_K_FIELDS

    source = resolve(model_type)
    with quiet_transformers():
        tiny, default = tiny_config(source.config_cls), default_config(source.config_cls)
    text = default.get_text_config()
    if any(f in vars(text) and getattr(text, f) is None for f in TOP_K_FIELDS):
        return [("tiny", tiny, "meta")]
    return [("tiny", tiny, "meta"), ("default", default, "meta")]


# Types the Model Optimizer target refuses, with the reason generate prints: overrides that set
# a sub-config's field (DBRX's sizes live in attn_config / ffn_config), which Model Optimizer's
# deci_x_patcher cannot apply (it calls config.update with the override keys)
NO_MODELOPT = {
    "dbrx": "dbrx: no Model Optimizer descriptor: its overrides set sub-config fields "
    "(attn_config.kv_n_heads, ffn_config.moe_num_experts, ffn_config.moe_top_k, "
    "ffn_config.ffn_hidden_size), which Model Optimizer's deci_x_patcher (config.update) "
    "cannot set",
}


@pytest.mark.parametrize("model_type", sorted(NO_MODELOPT))
def test_no_modelopt_descriptor_says_why(model_type):
    with pytest.raises(PuzzleGenError, match=re.escape(NO_MODELOPT[model_type])):
        render_modelopt(spec_of(model_type))


def render_modelopt(spec, pruning=NO_PRUNING, layout="package"):
    cmd = modelopt.command(spec, None, "modelopt", layout)
    target = modelopt.descriptor_target(spec, layout, pruning, cmd)
    return render.render_descriptor(modelopt.target_spec(spec, "modelopt"), None, target)


# -- converters --------------------------------------------------------------------------------
# Types whose layers a block config cannot describe (the reason generate prints, in part).
NO_CONVERTER = {
    # token mixers that keep no key/value cache (so no KV heads) and have no Mamba-form sizes
    # (overrides.MAMBA_FIELDS): LFM2 / LFM3 short convolutions, MiniMax's lightning (linear)
    # attention, Kimi's and Bailing's delta-rule attentions (Kimi's one head width and count
    # for keys and values, linear_head_dim / linear_num_heads, would fill two Mamba sizes each)
    "lfm3": "attention.num_key_value_heads of Lfm3DecoderLayer with conv: Lfm3ShortConv and no "
    "rule for it could be confirmed on tiny and default-size models: its layers keep no "
    "key/value cache (a tiny forward fills a LinearAttentionLayer with conv_states",
    "lfm2_moe": "attention.num_key_value_heads of Lfm2MoeDecoderLayer with conv: "
    "Lfm2MoeShortConv, feed_forward: Lfm2MoeMLP and no rule for it could be confirmed on tiny and "
    "default-size models: its layers keep no key/value cache",
    "minimax": "attention.num_key_value_heads of MiniMaxDecoderLayer with self_attn: "
    "MiniMaxLightningAttention and no rule for it could be confirmed on tiny and default-size "
    "models: its layers keep no key/value cache (a tiny forward fills a DynamicLayer with no keys)",
    "kimi_linear": "attention.num_key_value_heads of KimiLinearDecoderLayer with self_attn: "
    "KimiLinearDeltaAttention, mlp: KimiLinearMLP and no rule for it could be confirmed on tiny "
    "and default-size models: its layers keep no key/value cache (a tiny forward fills a "
    "LinearAttentionLayer with conv_states, recurrent_states, no keys)",
    "bailing_hybrid": "attention.num_key_value_heads of BailingHybridDecoderLayer with self_attn:"
    " BailingHybridDeltaAttention, mlp: BailingHybridMLP and no rule for it could be confirmed on "
    "tiny and default-size models: its layers keep no key/value cache (a tiny forward fills a "
    "LinearAttentionLayer with conv_states, recurrent_states, no keys)",
    # the same short convolution as lfm2_moe, but LFM2's tiny config builds attention layers
    # only (layer_types all full_attention), so the conv kind's cache is not measured
    "lfm2": "attention.num_key_value_heads of Lfm2DecoderLayer with conv: Lfm2ShortConv and no "
    "rule for it could be confirmed on tiny and default-size models: the tiny config builds no "
    "layer of this kind (configs with layer_types[i] = 'conv' do): not measured",
    # KV heads held per layer (per_layer_config: the sliding layers' own heads), which a
    # block-config override cannot write: no field and no measured rule sets them
    "dots3_note": "attention.num_key_value_heads of Dots3NoteTextDecoderLayer with mlp: "
    "Dots3NoteTextMLP",
    "dots3_note_text": "attention.num_key_value_heads of Dots3NoteTextDecoderLayer with mlp: "
    "Dots3NoteTextMLP",
    # Falcon-H1 runs self_attn and a Mamba mixer side by side in one attention subblock;
    # a block config's attention is a KV-cache attention or a Mamba mixer, not both
    "falcon_h1": "FalconH1DecoderLayer holds a key/value attention and a Mamba mixer in one "
    "attention subblock",
    # OpenAI-GPT's attention reads no KV-head field (multi-head only) and no rule for its heads
    # could be confirmed on tiny and default-size models
    "openai-gpt": "no config field sets attention.num_key_value_heads of Block",
    # RecurrentGemma's recurrent (RG-LRU) temporal block has no key/value cache and no
    # Mamba-form sizes
    "recurrent_gemma": "no config field sets attention.num_key_value_heads of "
    "RecurrentGemmaDecoderLayer with temporal_block: RecurrentGemmaRecurrentBlock",
    # RWKV's time mix keeps a recurrent state (the model's `state` tensors, not a key/value
    # cache): it has no heads, no KV-head field and no Mamba-form sizes
    "rwkv": "no config field sets attention.num_key_value_heads of RwkvBlock with pre_ln and no "
    "rule for it could be confirmed on tiny and default-size models",
}


def test_every_verified_type_has_a_converter_that_check_covers():
    for t in VERIFIED:
        package, _ = generated._DESCRIPTORS[t]
        path = ROOT / "generated" / package / f"{package}_converter.py"
        if t in NO_CONVERTER:
            assert not path.exists(), t
            continue
        text = path.read_text()
        assert "puzzletron_runtime.block_config" in text and "modelopt" not in text
        assert "Regenerate: puzzle-gen generate" in text  # the header `check` regenerates from


@pytest.mark.parametrize("model_type", sorted(t for t in NO_CONVERTER if t in VERIFIED))
def test_no_converter_says_which_size_of_which_kind(model_type):
    with pytest.raises(PuzzleGenError, match=re.escape(NO_CONVERTER[model_type])):
        modelopt.render_converter(spec_of(model_type))


def test_a_token_mixer_without_keys_in_its_cache_is_named_as_such(monkeypatch):
    """The KV-heads rule measures the key/value cache a tiny forward fills; a layer whose cache
    holds recurrent states and no keys (a short convolution, a linear attention) has no KV
    heads, and the converter says so instead of failing on a missing attribute."""

    class StatesOnly:  # a cache layer of a linear-attention layer: states, no keys
        def __init__(self):
            self.conv_states = {0: torch.zeros(1)}
            self.number_of_states = 1

    class Out:
        past_key_values = type("Cache", (), {"layers": [StatesOnly()] * 8})()

    spec = spec_of("llama")
    (kind,) = spec.kinds
    probe = modelopt.SizeProbe(spec)
    monkeypatch.setattr(probe, "model", lambda config, device="meta": lambda **kw: Out())
    monkeypatch.setattr(probe, "layer_of", lambda kind, config: 0)
    with pytest.raises(PuzzleGenError, match="fills a StatesOnly with conv_states, no keys"):
        probe.kv_heads_rule(kind)


CONVERTED = [p for p in BY_TYPE if p.values[0] not in NO_CONVERTER]
# Mamba-1 mixers: no heads, head width or groups; Model Optimizer's MambaConfig (a Mamba-2
# description) requires them, so only our runtime's converter is written
MAMBA_1 = {"mamba", "falcon_mamba", "jamba"}


@pytest.mark.parametrize("model_type", sorted(t for t in MAMBA_1 if t in VERIFIED))
def test_a_mamba_1_mixer_has_no_model_optimizer_converter(model_type):
    spec = spec_of(model_type)
    text = modelopt.render_converter(spec)  # ours: the sizes it has
    assert "attention.mamba.num_heads, head_dim, num_groups: None" in " ".join(text.split())
    with pytest.raises(PuzzleGenError, match="no config field sets attention.mamba.num_heads"):
        modelopt.render_converter(spec, target="modelopt")


def layer_parts(block):
    """("no_op" | "kv" | "mamba", "no_op" | "dense" | "moe") of a block config dict."""
    a, f = block["attention"], block["ffn"]
    attention = "no_op" if a["no_op"] else "mamba" if a.get("mamba") else "kv"
    ffn = "no_op" if f["no_op"] else "moe" if f.get("moe") else "dense"
    return attention, ffn


@pytest.mark.parametrize("model_type", CONVERTED)
def test_converter_block_configs_rebuild_every_tensor_shape(model_type):
    converter = converter_of(model_type)
    for label, config, device in configs(model_type):
        block_configs = converter.create_block_configs_from_main_config(config)
        text = config.get_text_config()
        assert len(block_configs) == text.num_hidden_layers, label
        for b in block_configs:  # config.json form, every size Model Optimizer asserts on
            assert BlockConfig.from_dict(b).to_dict() == b, label
            attention, ffn = layer_parts(b)
            if attention == "kv":
                assert isinstance(b["attention"]["num_key_value_heads"], int), label
            if attention == "mamba":  # a state size at least; None: the model's own
                mamba = b["attention"]["mamba"]
                assert isinstance(mamba["state_dim"], int), label
                assert all(v is None or isinstance(v, int) for v in mamba.values()), label
                if model_type not in MAMBA_1:  # Model Optimizer needs all four
                    assert all(isinstance(v, int) for v in mamba.values()), label
            if ffn == "dense":
                assert isinstance(b["ffn"]["intermediate_size"], int), label
            if ffn == "moe":
                moe = b["ffn"]["moe"]
                assert all(
                    isinstance(moe[k], int)
                    for k in ("num_local_experts", "num_experts_per_tok", "expert_intermediate_dim")
                ), label
        original = shapes(build_model(resolve(model_type).causal_lm_cls, config, device))
        assert rebuilt_shapes(model_type, config, block_configs, device) == original, label


def _new_value(size, current, text):
    """Another value of a block-config size, as the override inference probes them."""
    from generator.overrides import _fewer_heads, _other_size

    if size == "attention.num_key_value_heads":
        return _fewer_heads(current, text)
    if size == "ffn.moe.num_local_experts":
        return current + 2
    if size == "ffn.moe.num_experts_per_tok":
        return None  # changes no shape
    return _other_size(current, text)


def _leaf(block, size):
    node = block
    for part in size.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def _set_leaf(block, size, value):
    block = json.loads(json.dumps(block))
    node = block
    *parents, last = size.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return block


@pytest.mark.parametrize("model_type", CONVERTED)
def test_each_block_config_addresses_its_own_layer(model_type):
    """The per-layer pattern: changing one size of block i alone (each size the descriptor
    overrides and that block holds) changes tensor shapes of layer i and of no other layer.
    A block config of the wrong kind for its layer (expert sizes for a dense layer, a Mamba
    state for an attention) changes nothing there, and fails."""
    descriptor = generated.get_descriptor(model_type)
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    text = config.get_text_config()
    blocks = converter_of(model_type).create_block_configs_from_main_config(config)
    sizes = {o.block_config_attr for o in spec_of(model_type).overrides}
    if not sizes:  # Bloom, MPT: widths fixed by the hidden size; no block config resizes a layer
        pytest.skip("the descriptor overrides no size")
    base = rebuilt_shapes(model_type, config, blocks, "meta")
    tried = 0
    for i, block in enumerate(blocks):
        for size in sorted(sizes):
            current = _leaf(block, size)
            if current is None:
                continue
            value = _new_value(size, current, text)
            if value is None:
                continue
            changed = rebuilt_shapes(
                model_type, config, [*blocks[:i], _set_leaf(block, size, value), *blocks[i + 1 :]],
                "meta",
            )  # fmt: skip
            layers = {
                k[len(descriptor.layer_block_name(0)) - 1 :].split(".")[0]
                for k in set(base) | set(changed)
                if base.get(k) != changed.get(k)
                and k.startswith(descriptor.layer_block_name(0)[:-1])
            }
            outside = {
                k
                for k in set(base) | set(changed)
                if base.get(k) != changed.get(k)
                and not k.startswith(descriptor.layer_block_name(0)[:-1])
            }
            assert layers == {str(i)} and not outside, (i, size, value, layers, outside)
            tried += 1
    assert tried >= len(blocks)  # every layer has at least one size it is addressed by


# Configs whose per-layer pattern differs from the default and the tiny one, with the parts
# each layer must get, written from the config's own documentation of its pattern fields.
PATTERNS = {
    "nemotron_h": (
        {"num_hidden_layers": 6, "hybrid_override_pattern": "M*-EM-"},
        [("mamba", "no_op"), ("kv", "no_op"), ("no_op", "dense"), ("no_op", "moe"),
         ("mamba", "no_op"), ("no_op", "dense")],
    ),
    "qwen3_next": (
        {"num_hidden_layers": 3,
         "layer_types": ["full_attention", "linear_attention", "full_attention"]},
        [("kv", "moe"), ("mamba", "moe"), ("kv", "moe")],
    ),
    "deepseek_v3": (
        {"num_hidden_layers": 3, "first_k_dense_replace": 2},
        [("kv", "dense"), ("kv", "dense"), ("kv", "moe")],
    ),
    "jamba": (
        {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 0,
         "expert_layer_period": 4, "expert_layer_offset": 3},
        [("kv", "dense"), ("mamba", "dense"), ("kv", "dense"), ("mamba", "moe")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(t for t in PATTERNS if t in VERIFIED))
def test_converter_reads_the_pattern_of_any_config(model_type):
    changes, expected = PATTERNS[model_type]
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls, **changes)
    blocks = converter_of(model_type).create_block_configs_from_main_config(config)
    parts = [layer_parts(b) for b in blocks]
    assert parts == expected
    original = shapes(build_model(source.causal_lm_cls, config, "meta"))
    assert rebuilt_shapes(model_type, config, blocks, "meta") == original


# Layers of one kind whose KV heads differ: MiMo-V2-Flash's sliding-window layers build
# 2 x config.num_key_value_heads (modeling_mimo_v2_flash.py:341), its full ones 1 x. The block
# config holds the field the override writes back, so the rebuild is right, but Model
# Optimizer's KV-head count of the sliding layers is half their cache's (a known gap).
KV_HEADS_DERIVED_PER_LAYER = {"mimo_v2_flash"}


@pytest.mark.parametrize(
    "model_type",
    [
        pytest.param(*p.values, marks=[*p.marks, pytest.mark.xfail(strict=True, reason="per-layer "
                     "KV heads derived from one field")], id=p.id)
        if p.values[0] in KV_HEADS_DERIVED_PER_LAYER else p
        for p in CONVERTED
    ],
)  # fmt: skip
def test_converter_kv_heads_are_the_heads_of_the_key_value_cache(model_type):
    """What Model Optimizer counts as KV heads (KV-cache memory, KV-head pruning) is the head
    dimension of the cache a forward fills, in every layer that fills keys and values."""
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    model = build_model(source.causal_lm_cls, config, "cpu")
    ids = torch.arange(6).unsqueeze(0) % config.get_text_config().vocab_size
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    blocks = converter_of(model_type).create_block_configs_from_main_config(config)
    checked = 0
    for i, block in enumerate(blocks):
        if layer_parts(block)[0] != "kv":
            continue
        layer = cache.layers[i]
        assert block["attention"]["num_key_value_heads"] == layer.keys.shape[1], i
        checked += 1
    assert checked or all(layer_parts(b)[0] != "kv" for b in blocks)


@pytest.mark.parametrize("model_type", CONVERTED)
def test_converter_follows_the_fields_the_overrides_write(model_type):
    """Another value of each overridden config field gives block configs with that value, in
    every layer whose block holds that size and that reads the field (an override whose kind's
    layers read the size from different fields says which layers read it: Inkling's sliding
    layers read swa_num_key_value_heads; the others must keep their value)."""
    source = resolve(model_type)
    converter = converter_of(model_type)
    spec = spec_of(model_type)
    with quiet_transformers():
        base_config = tiny_config(source.config_cls)
    base = base_config.get_text_config()
    # the overrides of the kinds the tiny config's layers have (a kind only other configs build,
    # such as a dense layer of an all-MoE tiny stack, holds its sizes in no block config here)
    layers = build_model(source.causal_lm_cls, base_config, "meta").get_submodule(spec.layer_stack)
    present = {
        o
        for kind in spec.kinds
        if any(modelopt.kind_holds(spec, kind, layer) for layer in layers)
        for o in modelopt.kind_overrides(kind)
    }
    base_blocks = converter.create_block_configs_from_main_config(base_config)
    for o in spec.overrides:
        if o not in present:
            continue
        current = config_value(base, o.config_field)  # dotted: a sub-config's field
        value = _new_value(o.block_config_attr, current, base)
        if o.block_config_attr == "ffn.moe.num_experts_per_tok":
            value = current - 1 or 2
        if value is None:
            continue
        with quiet_transformers():
            config = tiny_config(source.config_cls)
        set_config_field(config.get_text_config(), o.config_field, value)  # the text config's
        blocks = converter.create_block_configs_from_main_config(config)
        reads = [all(kinds.holds(t, layer, {}) for t in o.layers) for layer in layers]
        held = [_leaf(b, o.block_config_attr) for b, r in zip(blocks, reads) if r]
        held = [v for v in held if v is not None]
        assert held and set(held) == {value}, (o.config_field, held)
        others = [_leaf(b, o.block_config_attr) for b, r in zip(blocks, reads) if not r]
        kept = [_leaf(b, o.block_config_attr) for b, r in zip(base_blocks, reads) if not r]
        assert others == kept, (o.config_field, others, kept)


def test_shape_check_catches_a_converter_reading_the_wrong_field():
    """The shape check above can fail: KV heads read from num_attention_heads build other k/v
    shapes."""
    with quiet_transformers():
        config = tiny_config(resolve("llama").config_cls, num_key_value_heads=1)
    good = converter_of("llama").create_block_configs_from_main_config(config)
    wrong = [
        {**b, "attention": {**b["attention"], "num_key_value_heads": config.num_attention_heads}}
        for b in good
    ]
    original = shapes(build_model(resolve("llama").causal_lm_cls, config, "meta"))
    rebuilt = rebuilt_shapes("llama", config, wrong, "meta")
    assert {k for k in original if rebuilt[k] != original[k]} == {
        f"model.layers.{i}.self_attn.{p}.weight"
        for i in range(config.num_hidden_layers)
        for p in ("k_proj", "v_proj")
    }


def test_pattern_check_catches_a_converter_of_one_kind_for_a_mixed_stack():
    """The per-layer checks can fail: DeepSeek-V3's block configs with the first layer's (dense)
    block repeated for every layer leave the expert sizes of the MoE layers unaddressed."""
    with quiet_transformers():
        config = tiny_config(resolve("deepseek_v3").config_cls)
    good = converter_of("deepseek_v3").create_block_configs_from_main_config(config)
    parts = [layer_parts(b) for b in good]
    assert ("kv", "dense") in parts and ("kv", "moe") in parts
    one_kind = [good[0]] * len(good)
    moe_layer = parts.index(("kv", "moe"))
    changed = [*one_kind]
    changed[moe_layer] = _set_leaf(good[0], "ffn.intermediate_size", 48)
    base = rebuilt_shapes("deepseek_v3", config, one_kind, "meta")
    after = rebuilt_shapes("deepseek_v3", config, changed, "meta")
    assert base == after  # a dense width on an expert layer addresses nothing


def test_a_derived_width_must_build_the_models_shapes():
    """GPT-2 leaves n_inner to the modeling code (None: 4 x hidden); the rule is confirmed by
    building, so a wrong one is refused."""
    spec = spec_of("gpt2")
    (kind,) = spec.kinds
    probe = modelopt.SizeProbe(spec)
    expr, _ = probe.ffn_width_rule(kind, "n_inner")
    hidden = probe.default.get_text_config().hidden_size
    assert probe.evaluate(expr, probe.default.get_text_config()) == 4 * hidden
    original = modelopt.SizeProbe.subblock_dims
    probe.subblock_dims = lambda k, w, config: {d + 1 for d in original(probe, k, w, config)}
    with pytest.raises(PuzzleGenError):
        probe.ffn_width_rule(kind, "n_inner")


def test_a_mamba_size_no_override_sets_is_read_where_the_whole_model_reads_it():
    """Nemotron-H's mamba_num_heads cannot change for one layer alone (no override), but Model
    Optimizer's MambaConfig needs the heads: the converter reads the field whose change resizes
    the Mamba mixers, and that is the heads of their A and D parameters."""
    spec = spec_of("nemotron_h")
    (mamba,) = [k for k in spec.kinds if modelopt.kind_overrides(k, "attention.mamba")]
    assert "attention.mamba.num_heads" not in {o.block_config_attr for o in mamba.overrides}
    expr, note = modelopt.SizeProbe(spec).mamba_rule(mamba, "attention.mamba.num_heads")
    assert expr == "text_config.mamba_num_heads" and "not per layer" in note
    source = resolve("nemotron_h")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    blocks = converter_of("nemotron_h").create_block_configs_from_main_config(config)
    model = build_model(source.causal_lm_cls, config, "meta")
    for i, block in enumerate(blocks):
        if layer_parts(block)[0] == "mamba":
            mixer = model.model.layers[i].mixer
            assert block["attention"]["mamba"]["num_heads"] == mixer.A_log.shape[0]


def mamba2_mixer_sizes(num_heads, head_dim):
    """A tiny Mamba-2 config with these heads and head width (the inner width follows), its
    block configs from the generated converter, and its first mixer."""
    source = resolve("mamba2")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    config.num_heads, config.head_dim = num_heads, head_dim
    config.expand = num_heads * head_dim // config.hidden_size
    blocks = converter_of("mamba2").create_block_configs_from_main_config(config)
    mixer = build_model(source.causal_lm_cls, config, "meta").backbone.layers[0].mixer
    return blocks, mixer


def test_plain_named_mamba_heads_and_head_width_are_read_for_model_optimizer():
    """Mamba2Config names the mixer's heads and head width `num_heads` / `head_dim`, as attention
    configs do: the heads are the field that resizes only what the state size resizes (A, D,
    dt_bias, in_proj), the head width the field whose product with the heads is the width the
    output projection reads. Before this rule Model Optimizer's MambaConfig could not be filled."""
    for num_heads, head_dim in ((8, 16), (4, 64)):
        blocks, mixer = mamba2_mixer_sizes(num_heads, head_dim)
        for b in blocks:
            mamba = b["attention"]["mamba"]
            assert mamba["num_heads"] == mixer.A_log.shape[0] == num_heads
            assert mamba["head_dim"] * mamba["num_heads"] == mixer.out_proj.in_features
            assert mamba["head_dim"] == head_dim
    text = " ".join(modelopt.render_converter(spec_of("mamba2"), target="modelopt").split())
    assert "num_heads=text_config.num_heads, head_dim=text_config.head_dim," in text


def test_a_plain_named_head_width_of_attention_layers_is_not_a_mamba_size():
    """Nemotron-H's attention layers read config.head_dim, and their module is named `mixer`
    like the Mamba layers': its change resizes other layers than the state size does, so it is
    refused as the Mamba head width."""
    from generator.modelopt import mamba_rules

    spec = spec_of("nemotron_h")
    (mamba,) = [k for k in spec.kinds if modelopt.kind_overrides(k, "attention.mamba")]
    probe = modelopt.SizeProbe(spec)
    state = mamba_rules.state_field(probe, mamba)
    assert state is not None
    within = mamba_rules.resized_modules(probe, state)
    assert within and mamba_rules.resized_modules(probe, "head_dim")  # it resizes something
    assert mamba_rules.resizing_field(probe, mamba, ("head_dim",), within=within) is None


def test_a_head_width_must_make_the_output_projections_width_with_the_heads():
    """Rule 3 refuses a field the mixer reads whose product with the heads is not the width its
    output projection reads (Mamba-2's n_groups)."""
    from generator.modelopt import mamba_rules

    spec = spec_of("mamba2")
    (kind,) = spec.kinds
    probe = modelopt.SizeProbe(spec)
    with pytest.raises(PuzzleGenError, match="no config field holds attention.mamba.head_dim"):
        mamba_rules.head_width_rule(probe, kind, ("n_groups", "state_size"))
    assert mamba_rules.head_width_rule(probe, kind, ("n_groups", "head_dim"))[0] == (
        "text_config.head_dim"
    )


def test_a_missing_size_without_a_rule_means_no_converter():
    spec = spec_of("llama")
    (kind,) = spec.kinds
    no_ffn = dataclasses.replace(
        spec,
        kinds=(dataclasses.replace(kind, overrides=modelopt.kind_overrides(kind, "attention")),),
    )
    broken = dataclasses.replace(no_ffn, layer_stack="model.nowhere")  # nothing to measure
    with pytest.raises(PuzzleGenError, match="no converter: no config field sets ffn.intermediate"):
        modelopt.render_converter(broken)


def test_nested_text_config_is_read_through_its_attribute():
    spec = dataclasses.replace(spec_of("llama"), text_config_attr="text_config")
    text = modelopt.render_converter(spec)
    assert "text_config = config.text_config\n" in text
    assert "for _ in range(text_config.num_hidden_layers)" in text


# -- the buffer rebuild written into Model Optimizer descriptors ---------------------------------


def inline_helper(text, sabotage=None):
    """The `_rebuild_buffers` function of a rendered module, compiled on its own (its module
    imports Model Optimizer, which is not installed here); `sabotage` drops the statements
    whose source contains it."""
    tree = ast.parse(text)
    (func,) = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_rebuild_buffers"
    ]
    if sabotage:

        class Drop(ast.NodeTransformer):
            def visit_Expr(self, node):
                return None if sabotage in ast.unparse(node) else node

        func = ast.fix_missing_locations(Drop().visit(func))
    scope = {"nn": nn, "PreTrainedModel": PreTrainedModel}
    exec(compile(ast.Module([func], []), "<helper>", "exec"), scope)
    return scope["_rebuild_buffers"]


def meta_loaded(model_type):
    """A tiny model and a copy built on the meta device with its state dict assigned: what a
    sharded loader holds before the descriptor rebuilds buffers."""
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    reference = build_model(source.causal_lm_cls, config, "cpu")
    model = build_model(source.causal_lm_cls, config, "meta")
    model.load_state_dict(reference.state_dict(), strict=False, assign=True)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    return reference, model


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_inline_rebuild_gives_transformers_buffers(model_type):
    if model_type in NO_MODELOPT:
        pytest.skip("no Model Optimizer descriptor (test_no_modelopt_descriptor_says_why)")
    spec = spec_of(model_type)
    if not spec.rebuilt_buffers:
        assert "_rebuild_buffers" not in render_modelopt(spec)
        return
    helper = inline_helper(render_modelopt(spec))
    reference, model = meta_loaded(model_type)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    helper(model, torch.device("cpu"))
    expected = dict(reference.named_buffers())
    got = dict(model.named_buffers())
    assert got.keys() == expected.keys()
    for name, buffer in got.items():
        assert buffer.device.type == "cpu" and torch.equal(buffer, expected[name]), name
    for name, value in weights.items():  # no loaded weight initialised again
        assert torch.equal(model.state_dict()[name], value), name


def test_inline_move_to_sole_subblock_equals_the_runtimes():
    """Model Optimizer has no move_to_sole_subblock: the Model Optimizer target writes it into
    the module. On Nemotron-H's tensor names (module and checkpoint forms) both give the same
    groups, and a sabotaged copy does not (the comparison can fail)."""
    from puzzletron_runtime.model_descriptor.weight_groups import move_to_sole_subblock

    spec = spec_of("nemotron_h")
    text = render_modelopt(spec)
    tree = ast.parse(text)
    (func,) = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name == "_move_to_sole_subblock"
    ]

    def compiled(node):
        scope = {"re": re}
        exec(compile(ast.Module([node], []), "<helper>", "exec"), scope)
        return scope["_move_to_sole_subblock"]

    inline = compiled(func)
    sabotaged = ast.parse(ast.unparse(func).replace("moving + out[ffn]", "out[ffn]")).body[0]
    broken = compiled(sabotaged)
    descriptor = generated.get_descriptor("nemotron_h")
    source = resolve("nemotron_h")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    names = list(build_model(source.causal_lm_cls, config, "meta").state_dict())
    n = config.num_hidden_layers
    followers = re.compile(r"^model\.layers\.\d+\.norm\..+$")
    from puzzletron_runtime.model_descriptor import ModelDescriptor

    base = ModelDescriptor.get_weight_groups.__func__(descriptor, names, n)  # before the move
    groups = {k: list(v) for k, v in base.items()}
    assert move_to_sole_subblock(groups, n, followers) != groups  # something moves
    assert inline(groups, n, followers) == move_to_sole_subblock(groups, n, followers)
    assert broken(groups, n, followers) != move_to_sole_subblock(groups, n, followers)


def test_inline_group_by_layer_kind_equals_the_runtimes():
    """Model Optimizer has no group_by_layer_kind: the Model Optimizer target writes it (and
    _split_roles) into the module. On OLMo-hybrid's tensor names, whole layers and layers left
    without one subblock, both give the same groups, and a sabotaged copy does not."""
    from puzzletron_runtime.model_descriptor import ModelDescriptor
    from puzzletron_runtime.model_descriptor.kind_groups import group_by_layer_kind

    spec = spec_of("olmo_hybrid")
    p = spec.predicates
    helpers = [
        n
        for n in ast.parse(render_modelopt(spec)).body
        if isinstance(n, ast.FunctionDef) and n.name in ("_split_roles", "_group_by_layer_kind")
    ]
    assert len(helpers) == 2

    def compiled(nodes):
        scope = {"re": re}
        exec(compile(ast.Module(nodes, []), "<helpers>", "exec"), scope)
        return scope["_group_by_layer_kind"]

    inline = compiled(helpers)
    sabotaged = ast.parse(ast.unparse(helpers[0]).replace("others & children", "children"))
    broken = compiled(sabotaged.body + helpers[1:])
    descriptor = generated.get_descriptor("olmo_hybrid")
    source = resolve("olmo_hybrid")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    names = list(build_model(source.causal_lm_cls, config, "meta").state_dict())
    n = config.num_hidden_layers
    # a heterogeneous checkpoint: layer 0 without its attention, the last without its FFN
    names = [x for x in names if not re.match(r"model\.layers\.0\.(linear_attn|input_)", x)]
    names = [x for x in names if not re.match(rf"model\.layers\.{n - 1}\.(mlp|post_f)", x)]
    base = ModelDescriptor.get_weight_groups.__func__(descriptor, names, n)  # before the move
    groups = {k: list(v) for k, v in base.items()}
    args = (n, p.layer_prefix_regex(), p.by_kind, [(k.attention, k.ffn) for k in p.kind_children])
    want = group_by_layer_kind(groups, *args)
    assert want != groups  # something moves
    assert inline(groups, *args) == want
    with pytest.raises(ValueError):
        broken(groups, *args)


def test_inline_rebuild_refuses_to_leave_a_buffer_unset():
    """The check can fail: without the _init_weights call the helper raises instead of leaving
    NaN in the rotary tables."""
    helper = inline_helper(render_modelopt(spec_of("llama")), sabotage="_init_weights")
    _, model = meta_loaded("llama")
    with pytest.raises(RuntimeError, match="did not rebuild"):
        helper(model, torch.device("cpu"))


# -- target and layout -----------------------------------------------------------------------


MODELOPT_ONLY = {
    "_carry_plain_attributes",
    "_carry_structure",
    "_copy_plain_attributes",
    "_Hollow",
    "_rebuild_buffers",
    "_TupleDummyBlock",
    "_move_to_sole_subblock",
    "return_tuple_carrying",
}


def _comparable(text, modelopt_target):
    """The module without imports, the header's regenerate line, what only the Model Optimizer
    target adds (its helpers, pruning_mixins, layer descriptors), its create_dummy_block, and
    with its helper's name mapped back to the runtime's."""
    tree = ast.parse(text)
    body = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and (
            node.name in MODELOPT_ONLY or node.name.endswith("LayerDescriptor")
        ):
            continue
        if isinstance(node, ast.ClassDef):
            node.body = [
                n
                for n in node.body
                if not (
                    isinstance(n, ast.FunctionDef)
                    and n.name in ("pruning_mixins", "create_dummy_block")
                )
            ]
            for method in node.body:  # the no-ops' attribute carrying (Model Optimizer only)
                if isinstance(method, ast.FunctionDef) and method.name.endswith("no_op_post_init"):
                    method.body = [
                        n
                        for n in method.body
                        if "before" not in {x.id for x in ast.walk(n) if isinstance(x, ast.Name)}
                    ]
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
            continue
        body.append(node)
    dump = ast.dump(ast.Module(body, []))
    if not modelopt_target:
        return dump
    for helper in ("rebuild_buffers", "move_to_sole_subblock"):
        dump = dump.replace(f"'_{helper}'", f"'{helper}'")
    return dump


@pytest.mark.parametrize(
    "model_type", ["mistral", "gptj", "gemma", "nemotron_h", "qwen3_next", "rwkv"]
)
def test_modelopt_target_differs_only_in_imports_and_its_additions(model_type):
    """The same descriptor (kind dispatch, overrides with their optional groups, the vision
    group, the move of a layer's tensors to its sole subblock), under another name where Model
    Optimizer registers the model type (nemotron_h)."""
    spec = spec_of(model_type)
    default = render.render_descriptor(spec)
    ours = render_modelopt(spec)
    names = modelopt.names_for(spec, "modelopt")
    ours_as_default = ours.replace(names.descriptor_class, spec.class_name).replace(
        repr(names.registration).replace("'", '"'), repr(spec.model_type).replace("'", '"')
    )
    assert default != ours
    assert _comparable(default, False) == _comparable(ours_as_default, True)
    assert "from modelopt.torch.puzzletron.anymodel.model_descriptor import" in ours
    assert "puzzletron_runtime" not in ours


def test_registration_rule_never_reuses_a_model_optimizer_name():
    for name in modelopt.MODELOPT_REGISTERED:
        assert modelopt.registration_name(name, "modelopt") == f"{name}_generated"
        assert modelopt.registration_name(name, "puzzletron") == name  # our own factory
    assert modelopt.registration_name("mistral", "modelopt") == "mistral"
    names = modelopt.names_for(spec_of("llama"), "modelopt")
    assert names == modelopt.Names(
        "llama_generated",
        "llama_generated",
        "LlamaGeneratedModelDescriptor",
        "LlamaGeneratedConverter",
    )


def test_generate_modelopt_tree_writes_a_pull_request_layout(tmp_path, capsys):
    args = ["generate", "llama", "gemma", "--target", "modelopt", "--layout", "modelopt-tree"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    assert files == [
        "models/gemma/__init__.py",
        "models/gemma/gemma_converter.py",
        "models/gemma/gemma_model_descriptor.py",
        "models/llama_generated/__init__.py",
        "models/llama_generated/llama_generated_converter.py",
        "models/llama_generated/llama_generated_model_descriptor.py",
    ]
    pkg = tmp_path / "models" / "llama_generated"
    descriptor = (pkg / "llama_generated_model_descriptor.py").read_text()
    converter = (pkg / "llama_generated_converter.py").read_text()
    assert "from ....block_config import BlockConfig\n" in descriptor
    assert "from ...model_descriptor import ModelDescriptor, ModelDescriptorFactory\n" in descriptor
    assert "from ...converter import Converter, ConverterFactory\n" in converter
    assert '@ModelDescriptorFactory.register_decorator("llama_generated")' in descriptor
    assert '@ConverterFactory.register_decorator("llama_generated")' in converter
    assert "modelopt." not in descriptor + converter  # relative imports only
    assert "def _rebuild_buffers(" in descriptor and "puzzletron_runtime" not in descriptor
    init = (pkg / "__init__.py").read_text()
    assert "from .llama_generated_converter import *" in init
    assert "from .llama_generated_model_descriptor import *" in init
    assert "Regenerate: puzzle-gen generate llama --target modelopt --layout modelopt-tree" in init
    err = capsys.readouterr().err
    assert "add `from .llama_generated import *` to" in err
    for path in tmp_path.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")


def test_a_converter_no_longer_written_goes_but_files_of_others_stay(tmp_path, capsys):
    """Generating into a tree that holds a converter puzzle-gen wrote before and no longer
    writes (LFM2 under transformers 5.14 before its convolution kind was found) removes it; a
    file puzzle-gen did not write stays."""
    args = ["generate", "lfm2", "--target", "modelopt", "--layout", "modelopt-tree"]
    pkg = tmp_path / "models" / "lfm2"
    pkg.mkdir(parents=True)
    ours = pkg / "lfm2_converter.py"
    ours.write_text("# licence\n# Generated by puzzle-gen: do not edit. Change the generator.\n")
    theirs = pkg / "helpers.py"
    theirs.write_text("# a maintainer's own file\n")
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert not ours.exists() and theirs.exists()
    assert f"removed {ours}: no longer generated" in capsys.readouterr().err


def test_modelopt_tree_needs_the_modelopt_target(tmp_path, capsys):
    code = main(["generate", "llama", "--layout", "modelopt-tree", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "use --target modelopt" in err[0]
    assert not any(tmp_path.iterdir())


def test_generate_all_is_the_default_target_only(tmp_path, capsys):
    assert main(["generate", "--all", "--target", "modelopt", "--out", str(tmp_path)]) == 2
    assert "--all writes the default target only" in capsys.readouterr().err


def test_a_runtime_module_without_a_model_optimizer_counterpart_is_refused():
    with pytest.raises(PuzzleGenError, match="no counterpart of puzzletron_runtime.buffers"):
        modelopt.module_for("buffers", modelopt.MODELOPT)


def test_modelopt_target_dummy_blocks():
    """Attributes the model loop reads are set on Model Optimizer's DummyBlock after
    construction; a loop that indexes a layer's output gets a tuple-returning subclass."""
    spec = spec_of("llama")
    reads = dataclasses.replace(
        spec, dummy_block=dataclasses.replace(spec.dummy_block, attributes=("attention_type",))
    )
    text = render_modelopt(reads)
    assert "from modelopt.torch.puzzletron.utils.dummy_modules import DummyBlock" in text
    assert (
        "        dummy = DummyBlock(block_index=block_index)\n"
        "        dummy.attention_type = original_layer.attention_type\n"
        "        return _carry_structure(dummy, original_layer)\n"
    ) in text
    default = render.render_descriptor(reads)
    assert '"attention_type": original_layer.attention_type' in default  # our runtime's kwargs
    tuples = render_modelopt(spec_of("gptj"))
    assert "class _TupleDummyBlock(DummyBlock):" in tuples
    assert "dummy = _TupleDummyBlock(block_index=block_index)" in tuples


def test_modelopt_target_hands_back_what_a_layer_returns_unchanged():
    """Model Optimizer's no_op module has no return_tuple_carrying and its DummyBlock returns a
    tensor: the Model Optimizer target writes both for RWKV (whose time mix, channel mix and
    block return the recurrent `state` they were given), and they return what the runtime's do."""
    from puzzletron_runtime.puzzformer.no_op import MatchingZeros
    from puzzletron_runtime.utils.dummy_modules import DummyBlock as RuntimeDummy

    spec = spec_of("rwkv")
    tree = ast.parse(render_modelopt(spec))
    helpers = [
        n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        and n.name in ("return_tuple_carrying", "_TupleDummyBlock")
    ]
    assert len(helpers) == 2

    class DummyBlock(torch.nn.Module):  # Model Optimizer's: the hidden states, unchanged
        def __init__(self, block_index):
            super().__init__()

        def forward(self, x, *args, **kwargs):
            return x

    scope = {"nn": torch.nn, "DummyBlock": DummyBlock}
    exec(compile(ast.Module(helpers, []), "<helpers>", "exec"), scope)
    x, state = torch.ones(1, 3, 8), [torch.zeros(1, 8)]
    carried = tuple((c.index, c.keyword, c.position) for c in spec.dummy_block.carried)
    assert carried == ((1, "state", 1),)
    stand_in = scope["return_tuple_carrying"](MatchingZeros, 2, carried)()
    assert stand_in(x, state=state)[1] is state and stand_in(x, state)[1] is state
    assert torch.equal(stand_in(x, state=state)[0], torch.zeros_like(x))
    dummy = scope["_TupleDummyBlock"](block_index=0)
    ours = RuntimeDummy(0, returns_tuple=True, tuple_size=3, carried=carried)
    for args, kwargs in (((x,), {"state": state}), ((x, state), {}), ((x,), {})):
        assert dummy(*args, **kwargs) == ours(*args, **kwargs)
    assert dummy(x, state=state) == (x, state, None)


# -- pruning layer descriptors ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_pruning_layer_descriptors_from_data_flow(model_type):
    """The values Model Optimizer's hand-written llama / qwen descriptors hold."""
    p = modelopt.infer_pruning(spec_of(model_type))
    assert p.ffn == modelopt.FFNLayer(
        "mlp.down_proj",
        "model.layers.{layer_idx}.mlp",
        ("down_proj", "gate_proj", "up_proj"),
        p.ffn.evidence,
    )
    assert p.kv_heads == modelopt.KVHeadsLayer(
        "self_attn.o_proj",
        "model.layers.{layer_idx}.self_attn",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        p.kv_heads.evidence,
    )
    assert p.ffn_reason == p.kv_reason == ""


def test_fused_projections_get_no_pruning_descriptor_and_say_why():
    spec = spec_of("phi3")  # qkv_proj and gate_up_proj are single fused tensors
    p = modelopt.infer_pruning(spec)
    assert p.ffn is None and p.kv_heads is None
    assert "qkv_proj" in p.kv_reason
    assert "fused" in p.ffn_reason
    text = render_modelopt(spec, p)
    body = text[text.index("def pruning_mixins") :]
    assert "No KV-heads pruning: self_attn: 1 projection(s) read its input (qkv_proj)" in body
    assert "return {}" in body
    assert "KVHeadsLayerDescriptor" not in text


def test_a_query_projection_holding_a_gate_gets_no_kv_descriptor():
    """Qwen3-Next's q_proj outputs the queries and an output gate (twice what o_proj reads):
    Model Optimizer's KV-heads mixin would slice its rows as query heads. The widths come from
    the built model here, not from the generator."""
    spec = spec_of("qwen3_next")
    model, _ = modelopt.tiny_model(spec)
    attn = next(m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj"))
    assert attn.q_proj.weight.shape[0] == 2 * attn.o_proj.weight.shape[1]
    p = modelopt.infer_pruning(spec)
    assert p.kv_heads is None
    assert "output gate" in p.kv_reason and "q_proj" in p.kv_reason


def test_conv1d_projections_get_no_pruning_descriptor():
    p = modelopt.infer_pruning(spec_of("gpt2"))  # Conv1D: weights stored transposed
    assert p.ffn is None and p.kv_heads is None
    assert "no nn.Linear" in p.ffn_reason and "Conv1D" in p.ffn_reason


def test_kv_order_comes_from_data_flow_not_names(monkeypatch):
    """Rename the projections of a tiny llama (k_proj <-> v_proj swapped in the module tree):
    the descriptor follows what each module does, not what it is called."""
    from transformers.models.llama import modeling_llama

    original_init = modeling_llama.LlamaAttention.__init__

    def swapped_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        k, v = self.k_proj, self.v_proj
        del self.k_proj, self.v_proj
        self.k_proj, self.v_proj = v, k  # the module named k_proj now computes values

    monkeypatch.setattr(modeling_llama.LlamaAttention, "__init__", swapped_init)
    monkeypatch.setattr(
        modeling_llama.LlamaAttention,
        "forward",
        _forward_with_swapped_names(modeling_llama.LlamaAttention.forward),
    )
    p = modelopt.infer_pruning(spec_of("llama"))
    assert p.kv_heads.qkvo_weight_names == ("q_proj", "v_proj", "k_proj", "o_proj")


def _forward_with_swapped_names(forward):
    def wrapped(self, *args, **kwargs):
        self.k_proj, self.v_proj = self.v_proj, self.k_proj
        try:
            return forward(self, *args, **kwargs)
        finally:
            self.k_proj, self.v_proj = self.v_proj, self.k_proj

    return wrapped


def test_expert_descriptor_from_data_flow_not_names(monkeypatch):
    """Swap the names of Mixtral's router and experts in the module tree (the module named
    `gate` holds the experts, the one named `experts` routes): the descriptor follows what each
    module does."""
    from transformers.models.mixtral import modeling_mixtral

    block = modeling_mixtral.MixtralSparseMoeBlock
    original_init, original_forward = block.__init__, block.forward

    def swapped_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        gate, experts = self.gate, self.experts
        del self.gate, self.experts
        self.gate, self.experts = experts, gate

    def forward(self, *args, **kwargs):
        self.gate, self.experts = self.experts, self.gate
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            self.gate, self.experts = self.experts, self.gate

    monkeypatch.setattr(block, "__init__", swapped_init)
    monkeypatch.setattr(block, "forward", forward)
    plain = modelopt.infer_pruning(spec_of("mixtral")).experts
    assert plain.target_name == "mlp.experts"  # the module that routes
    assert plain.router_weights == ("experts.weight",)
    assert plain.is_fused_experts
    assert set(plain.fused_expert_weights) == {"gate.gate_up_proj", "gate.down_proj"}


def test_expert_removal_needs_one_router_with_a_logit_per_expert(monkeypatch):
    """A router whose output is not one logit per expert (here: its logits halved in width by a
    hook) cannot drive Model Optimizer's voting hooks: no descriptor, and the reason."""
    from transformers.models.mixtral import modeling_mixtral

    router = modeling_mixtral.MixtralTopKRouter
    original_forward = router.forward

    def forward(self, hidden_states, *args, **kwargs):
        out = original_forward(self, hidden_states, *args, **kwargs)
        return (out[0][..., :1], *out[1:]) if isinstance(out, tuple) else out[..., :1]

    monkeypatch.setattr(router, "forward", forward)
    p = modelopt.infer_pruning(spec_of("mixtral"))
    assert p.experts is None
    assert "one logit per expert" in p.experts_reason


def test_expert_removal_finds_the_expert_core_among_several_ffn_cores():
    """GraniteMoE-Hybrid's FFN subblock has two cores, its experts (`block_sparse_moe`) and a
    shared MLP beside them: the expert-removal descriptor is that of the core the expert count
    resizes. The shapes are read from built models here, not from the generator."""
    spec = spec_of("granitemoehybrid")
    model, config = modelopt.tiny_model(spec)
    text = config.get_text_config()
    more, _ = modelopt.tiny_model(spec, num_local_experts=text.num_local_experts + 2)
    layer, grown = model.model.layers[0], more.model.layers[0]
    assert layer.shared_mlp.state_dict().keys() == grown.shared_mlp.state_dict().keys()
    assert all(
        v.shape == grown.shared_mlp.state_dict()[k].shape
        for k, v in layer.shared_mlp.state_dict().items()
    )
    p = modelopt.infer_pruning(spec)
    assert p.experts is not None, p.experts_reason
    assert p.experts.moe_prefix_name == "model.layers.{layer_idx}.block_sparse_moe"


def _inline_helpers(text, *names):
    """The named top-level functions and classes of a rendered Model Optimizer module, compiled
    together on their own (the module imports Model Optimizer, which is not installed here)."""
    tree = ast.parse(text)
    nodes = [
        n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names
    ]
    assert {n.name for n in nodes} == set(names)
    scope = {"nn": nn}
    exec(compile(ast.Module(nodes, []), "<helpers>", "exec"), scope)
    return [scope[n] for n in names]


def test_inline_dummy_structure_lets_model_code_read_into_an_unowned_layer():
    """Model Optimizer's DummyBlock has nothing of the layer it stands for; the Model Optimizer
    target's create_dummy_block gives it the layer's weightless structure, as our runtime's
    does: RWKV's _rescale_layers divides each block's attention.output.weight in place, and
    nothing joins the state dict."""
    from puzzletron_runtime.utils.hollow import carry_structure

    text = render_modelopt(spec_of("rwkv"))
    assert "return _carry_structure(dummy, original_layer)" in text
    (carry,) = _inline_helpers(text, "_copy_plain_attributes", "_Hollow", "_carry_structure")[2:]
    source = resolve("rwkv")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    layer = build_model(source.causal_lm_cls, config, "cpu").rwkv.blocks[1]
    dummy = carry(nn.Module(), layer)
    assert dict(dummy.state_dict()) == {} and not list(dummy.parameters())
    dummy.attention.output.weight.div_(2)  # what _rescale_layers does
    assert dummy.layer_id == layer.layer_id
    ours = carry_structure(nn.Module(), layer)  # the runtime's, for the same names
    assert {n for n, _ in dummy.named_modules()} == {n for n, _ in ours.named_modules()}


def test_inline_no_op_keeps_the_plain_attributes_of_what_it_replaces():
    """Gemma 4's model reads every layer's self_attn.is_kv_shared_layer as it is built: the
    Model Optimizer target's no-ops give each stand-in the plain attributes of the child it
    replaces (Model Optimizer's patcher does not), and leave modules and tensors behind."""
    text = render_modelopt(spec_of("gemma4_text"))
    carry, _ = _inline_helpers(text, "_carry_plain_attributes", "_copy_plain_attributes")
    source = resolve("gemma4_text")
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    layer = build_model(source.causal_lm_cls, config, "meta").model.layers[0]
    before = dict(layer.named_children())
    layer.self_attn = nn.Identity()
    carry(layer, before)
    assert layer.self_attn.is_kv_shared_layer == before["self_attn"].is_kv_shared_layer
    assert not list(layer.self_attn.children()) and not list(layer.self_attn.parameters())
    method = text.split("def attn_no_op_post_init", 1)[1].split("def ", 1)[0]
    assert "before = dict(decoder_layer.named_children())" in method
    assert "_carry_plain_attributes(decoder_layer, before)" in method
