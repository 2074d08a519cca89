"""Every committed descriptor under generated/, proven on real tiny models.

For each model type: the descriptor imports and is registered; its names match the real model;
its weight groups partition every tensor of the default-size (meta) and tiny models and of a
saved checkpoint; heterogeneous block configs change exactly the requested shapes; a layer with
both subblocks no-op returns its input; a sharded checkpoint loads with equal logits.
The expectations are computed from the models themselves, never copied from the descriptor.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generated
from generator.source import resolve
from generator.tiny import tiny_config
from generator.verify import build, layer_io, sample_input, save_sharded
from puzzletron_runtime import ModelDescriptorFactory, load_model

MODEL_TYPES = generated.available()


@pytest.fixture(params=MODEL_TYPES)
def case(request):
    model_type = request.param
    descriptor = generated.get_descriptor(model_type)
    return model_type, descriptor, resolve(model_type).config_cls


def module_path(model, module):
    return next(name for name, m in model.named_modules() if m is module)


def test_the_four_families_are_generated():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(MODEL_TYPES)


def test_import_generated_imports_no_modeling_module():
    code = (
        "import sys, generated; "
        "print(sorted(m for m in sys.modules if '.modeling_' in m)); "
        "print(generated.available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"
    assert "llama" in lines[1]


def test_unknown_model_type_lists_available():
    with pytest.raises(KeyError, match="available: .*llama"):
        generated.get_descriptor("not_a_model")


def test_registered_in_the_factory(case):
    model_type, descriptor, _ = case
    assert ModelDescriptorFactory.get(model_type) is descriptor


def test_names_match_the_real_model(case):
    _, d, config_cls = case
    with torch.device("meta"):
        model = resolve_model(config_cls)
    assert module_path(model, model.get_input_embeddings()) == d.input_embedding_name()
    assert module_path(model, model.get_output_embeddings()) == d.output_embedding_name()
    n = model.config.get_text_config().num_hidden_layers
    stack = model.get_submodule(d.layer_block_name(0).rpartition(".")[0])
    assert isinstance(stack, torch.nn.ModuleList) and len(stack) == n
    for i in range(n):
        assert type(model.get_submodule(d.layer_block_name(i))) is d.decoder_layer_cls()
    norm = model.get_submodule(d.final_norm_name())
    shapes = [p.dim() for p in norm.parameters()]
    assert shapes and all(dim == 1 for dim in shapes)  # a norm: vectors (weight, maybe bias)


def resolve_model(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config_cls(**kw))


def groups_by_predicate(d, names, n):
    preds = d.layer_name_predicates(n)
    return {name: [g for g, p in preds.items() if p.match(name)] for name in names}


def test_weight_groups_partition_default_and_tiny_models(case):
    _, d, config_cls = case
    for config in (
        config_cls(),
        tiny_config(config_cls),
        tiny_config(config_cls, tie_word_embeddings=True),
    ):
        model = build(d, config, device="meta")
        n = config.get_text_config().num_hidden_layers
        keys = list(model.state_dict().keys())
        hits = groups_by_predicate(d, keys, n)
        assert all(len(h) == 1 for h in hits.values()), {
            k: h for k, h in hits.items() if len(h) != 1
        }
        groups = d.get_weight_groups(keys, n)
        assert sorted(k for v in groups.values() for k in v) == sorted(keys)
        # each layer's tensors go to that layer's groups, split by the subblock modules
        layer = model.get_submodule(d.layer_block_name(0))
        attn_core = _core_param_prefix(layer, "attn")
        for key in groups["block_0_attention"]:
            assert key.startswith(d.layer_block_name(0) + ".")
        assert any(attn_core in k for k in groups["block_0_attention"])
        assert set(groups) == {"embeddings", "lm_head"} | {
            f"block_{i}_{k}" for i in range(n) for k in ("attention", "ffn")
        }


def _core_param_prefix(layer, kind):
    # the module that computes attention: its class says so (its attribute name differs
    # between families: self_attn, attn, self_attention, attention)
    for name, module in layer.named_children():
        if "Attention" in type(module).__name__ and any(True for _ in module.parameters()):
            return f".{name}."
    raise AssertionError("no attention module found")


def _size_fields(d):
    """{kind: config field} the descriptor writes a block config's sizes to (found by probing
    its overrides with marker values)."""
    from puzzletron_runtime import BlockConfig

    probe = BlockConfig.from_dict(
        {
            "attention": {"no_op": False, "num_key_value_heads": 7},
            "ffn": {"no_op": False, "intermediate_size": 11},
        }
    )
    fields = {}
    for key, value in d.block_config_to_layer_overrides(probe).items():
        if value == 7:
            fields["attention"] = key
        elif value == 11:
            fields["ffn"] = key
    return fields


def _uniform_blocks(d, config):
    """Block configs repeating the config's own sizes (an FFN width the config leaves to a
    default, like GPT-2's n_inner=None, gets a concrete stand-in)."""
    fields = _size_fields(d)
    text = config.get_text_config()
    kv = getattr(text, fields["attention"]) if "attention" in fields else None
    width = getattr(text, fields["ffn"]) if "ffn" in fields else None
    # a KV-head count is required even where the descriptor does not override it
    block = {"attention": {"num_key_value_heads": kv if isinstance(kv, int) else 1}, "ffn": {}}
    if "ffn" in fields:
        block["ffn"]["intermediate_size"] = width if isinstance(width, int) else 64
    return [json.loads(json.dumps(block)) for _ in range(text.num_hidden_layers)]


def test_checkpoint_names_partition(case, tmp_path):
    _, d, config_cls = case
    config = tiny_config(config_cls, tie_word_embeddings=True)
    save_sharded(build(d, config), tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    n = config.num_hidden_layers
    assert all(len(h) == 1 for h in groups_by_predicate(d, names, n).values())
    assert "lm_head.weight" not in names  # tied: only the embedding is stored


def test_heterogeneous_block_configs_change_exactly_the_requested_shapes(case):
    _, d, config_cls = case
    config = tiny_config(config_cls)
    fields = _size_fields(d)
    assert fields, "the descriptor overrides no size"
    blocks = _uniform_blocks(d, config)
    width = blocks[0]["ffn"].get("intermediate_size")
    if "ffn" in fields:
        blocks[1]["ffn"]["intermediate_size"] = width // 4
    if "attention" in fields:
        blocks[2]["attention"]["num_key_value_heads"] = 1
    uniform = build(d, config, _uniform_blocks(d, config), device="meta")
    base = {k: v.shape for k, v in uniform.state_dict().items()}
    het = {k: v.shape for k, v in build(d, config, blocks, device="meta").state_dict().items()}
    assert set(base) == set(het)
    changed = {k for k in het if het[k] != base[k]}
    layer1, layer2 = d.layer_block_name(1) + ".", d.layer_block_name(2) + "."
    ffn_changed = {k for k in changed if k.startswith(layer1)}
    kv_changed = {k for k in changed if k.startswith(layer2)}
    assert changed == ffn_changed | kv_changed
    groups = d.get_weight_groups(list(het), config.num_hidden_layers)
    if "ffn" in fields:
        # FFN: every changed tensor shrinks (a fused gate_up has 2 x width // 4 rows)
        assert ffn_changed and all(het[k].numel() < base[k].numel() for k in ffn_changed)
        assert any(width // 4 in het[k] for k in ffn_changed)
        assert ffn_changed <= set(groups["block_1_ffn"])
    if "attention" in fields:
        # KV: the key/value projections (fused or not) shrink
        assert kv_changed and all(het[k].numel() < base[k].numel() for k in kv_changed)
        assert kv_changed <= set(groups["block_2_attention"])


def test_both_no_op_layer_returns_its_input_exactly(case):
    _, d, config_cls = case
    config = tiny_config(config_cls)
    blocks = _uniform_blocks(d, config)
    blocks[1] = {"attention": {"no_op": True}, "ffn": {"no_op": True}}
    model = build(d, config, blocks)
    layer = model.get_submodule(d.layer_block_name(1))
    normal = model.get_submodule(d.layer_block_name(0))
    # only modules both subblocks read (the shared norm of a parallel layout) keep weights
    kept = {n.split(".")[0] for n, _ in layer.named_parameters()}
    assert kept <= {n for n, c in normal.named_children() if "Attention" not in type(c).__name__}
    assert sum(p.numel() for p in layer.parameters()) < sum(p.numel() for p in normal.parameters())
    x, y = layer_io(model, layer, sample_input(config))
    assert torch.equal(x, y)
    # and a normal layer does change its input (the hook sees real data)
    x0, y0 = layer_io(model, model.get_submodule(d.layer_block_name(0)), sample_input(config))
    assert not torch.equal(x0, y0)


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_checkpoint_loads_with_equal_logits(case, tmp_path, tied):
    _, d, config_cls = case
    config = tiny_config(config_cls, tie_word_embeddings=tied)
    source = build(d, config, seed=3)
    ids = sample_input(config)
    with torch.no_grad():
        want = source(input_ids=ids).logits
    shards = save_sharded(source, tmp_path)
    assert len(shards) >= 2
    loaded = load_model(d, tmp_path, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(want, got)
    if tied:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    rotary = dict(loaded.named_buffers())
    assert all(b.device.type == "cpu" for b in rotary.values())


def test_heterogeneous_checkpoint_round_trip(case, tmp_path):
    _, d, config_cls = case
    config = tiny_config(config_cls)
    blocks = [
        {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 32 * (i + 1)}}
        for i in range(config.num_hidden_layers)
    ]
    blocks[3] = {"attention": {"no_op": True}, "ffn": {"intermediate_size": 16}}
    config.block_configs = blocks
    source = build(d, config, seed=5)
    ids = sample_input(config)
    with torch.no_grad():
        want = source(input_ids=ids).logits
    save_sharded(source, tmp_path)
    loaded = load_model(d, tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(want, loaded(input_ids=ids).logits)


def test_weight_groups_cover_config_variants_with_biases(case):
    """The descriptor is per model type, not per config: turning on every `*_bias` option the
    config has adds tensors that must still land in exactly one group."""
    _, d, config_cls = case
    flags = {
        k: True for k, v in config_cls().to_dict().items() if k.endswith("_bias") and v is False
    }
    config = tiny_config(config_cls, **flags)
    model = build(d, config, device="meta")
    keys = list(model.state_dict())
    if flags:
        assert any(k.endswith(".bias") for k in keys)
    hits = groups_by_predicate(d, keys, config.num_hidden_layers)
    assert all(len(h) == 1 for h in hits.values()), {k: h for k, h in hits.items() if len(h) != 1}
