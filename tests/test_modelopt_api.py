"""Generated Model Optimizer descriptors, proven with Model Optimizer itself.

Runs in the Model Optimizer environment (`make test-modelopt`: nvidia-modelopt 0.47 and a
transformers inside its range); skipped where modelopt is not importable. Everything is generated
here, under this environment's transformers, into temp dirs, as `--layout modelopt-tree` writes
it, and imported as a subpackage of Model Optimizer's own `anymodel.models` (so its relative
imports resolve as they would in a pull request).
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

anymodel = pytest.importorskip("modelopt.torch.puzzletron.anymodel")

from modelopt.torch.puzzletron.anymodel import convert_model  # noqa: E402
from modelopt.torch.puzzletron.anymodel.converter import Converter, ConverterFactory  # noqa: E402
from modelopt.torch.puzzletron.anymodel.model_descriptor import (  # noqa: E402
    ModelDescriptor,
    ModelDescriptorFactory,
)
from modelopt.torch.puzzletron.anymodel.puzzformer import deci_x_patcher  # noqa: E402
from modelopt.torch.puzzletron.block_config import BlockConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import generated  # noqa: E402
from generator import modelopt  # noqa: E402
from generator.cli import main  # noqa: E402
from generator.infer import infer  # noqa: E402
from generator.probe import build_model, quiet_transformers  # noqa: E402
from generator.source import resolve  # noqa: E402
from generator.tiny import tiny_config  # noqa: E402

pytestmark = pytest.mark.modelopt

MODEL_TYPES = generated.available()
# the hand-written Model Optimizer descriptor of the same model (name it registers under)
HAND_WRITTEN = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral_small"}
# what Model Optimizer registered before any generated module was imported
REGISTERED_BEFORE = (set(ModelDescriptorFactory.CLASS_MAPPING), set(ConverterFactory.CLASS_MAPPING))
PACKAGE = "modelopt.torch.puzzletron.anymodel.models"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("modelopt-tree")
    args = ["generate", *MODEL_TYPES, "--target", "modelopt", "--layout", "modelopt-tree"]
    assert main([*args, "--out", str(out)]) == 0
    found = {}
    for model_type in MODEL_TYPES:
        name = modelopt.registration_name(model_type, "modelopt")
        path = out / "models" / name
        qualified = f"{PACKAGE}.{name}"
        spec = importlib.util.spec_from_file_location(
            qualified, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        found[model_type] = SimpleNamespace(
            name=name,
            module=module,
            descriptor=ModelDescriptorFactory.get(name),
            converter=ConverterFactory.get(name),
        )
    return found


@lru_cache(maxsize=None)
def spec_of(model_type):
    return infer(model_type)


def tiny(model_type, **extra):
    with quiet_transformers():
        return tiny_config(resolve(model_type).config_cls, **extra)


def tiny_model(model_type, config):
    torch.manual_seed(0)
    return build_model(resolve(model_type).causal_lm_cls, config, "cpu")


IDS = torch.arange(12).unsqueeze(0) % 256


def test_the_registration_rule_knows_every_name_model_optimizer_registers():
    descriptors, converters = REGISTERED_BEFORE
    assert descriptors == converters == set(modelopt.MODELOPT_REGISTERED)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_module_imports_subclasses_and_registers(tree, model_type):
    t = tree[model_type]
    assert isinstance(t.descriptor, type) and issubclass(t.descriptor, ModelDescriptor)
    assert isinstance(t.converter, type) and issubclass(t.converter, Converter)
    assert t.name not in REGISTERED_BEFORE[0]  # never one of Model Optimizer's own names
    assert t.descriptor.__module__.startswith(f"{PACKAGE}.{t.name}.")
    assert t.descriptor.mlp_no_op_supported() and t.descriptor.attn_no_op_supported()
    assert set(t.descriptor.pruning_mixins()) == {"ffn_intermediate", "kv_heads"}


def test_package_layout_imports_with_absolute_imports(tmp_path):
    """`--target modelopt` without the tree layout: a package importing modelopt absolutely."""
    assert main(["generate", "qwen3", "--target", "modelopt", "--out", str(tmp_path)]) == 0
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import qwen3_generated as m\n"
        "from modelopt.torch.puzzletron.anymodel.converter import ConverterFactory\n"
        "from modelopt.torch.puzzletron.anymodel.model_descriptor import ModelDescriptorFactory\n"
        "assert ModelDescriptorFactory.get('qwen3_generated') is m.Qwen3GeneratedModelDescriptor\n"
        "assert ConverterFactory.get('qwen3_generated') is m.Qwen3GeneratedConverter\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


def _load_converted(descriptor, out_dir, device="cpu"):
    """Build the converted checkpoint the way Model Optimizer's loader does: on the meta device
    through its deci_x_patcher with the block configs in config.json, then the subblock
    tensors, then the rotary buffers through the descriptor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out_dir)
    block_configs = config.block_configs
    with deci_x_patcher(descriptor, block_configs), torch.device("meta"), quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device=device)
    index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(Path(out_dir) / file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    tied = set(missing) <= {"lm_head.weight"} and config.tie_word_embeddings
    assert not missing or tied, missing
    if missing:
        model.tie_weights()
    descriptor.init_rotary_embedding(model, SimpleNamespace(device=torch.device(device)))
    return model.eval(), block_configs, index


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_convert_model_round_trip_gives_the_original_logits(tree, model_type, tie, tmp_path):
    t = tree[model_type]
    config = tiny(model_type, tie_word_embeddings=tie)
    original = tiny_model(model_type, config)
    original.save_pretrained(tmp_path / "hf")
    convert_model(str(tmp_path / "hf"), str(tmp_path / "anymodel"), converter=t.name)
    model, block_configs, index = _load_converted(t.descriptor, tmp_path / "anymodel")
    assert block_configs == t.converter.create_block_configs_from_main_config(config)
    groups = {Path(f).stem for f in index["weight_map"].values()}
    assert groups == {"embeddings", "lm_head"} | {
        f"block_{i}_{kind}"
        for i in range(config.num_hidden_layers)
        for kind in ("attention", "ffn")
    }
    with torch.no_grad():
        expected = original(input_ids=IDS).logits
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patcher_builds_heterogeneous_block_configs(tree, model_type):
    """Model Optimizer's deci_x_patcher with its own BlockConfigs: the requested shapes, and
    no-op subblocks that are identities."""
    t = tree[model_type]
    config = tiny(model_type)
    base = t.converter.create_block_configs_from_main_config(config)
    narrow = {
        "attention": {"no_op": False, "num_key_value_heads": 1},
        "ffn": {"no_op": False, "intermediate_size": 64},
    }
    blocks = [
        {**base[0], "attention": {"no_op": True}},
        {**base[1], "ffn": {"no_op": True}},
        narrow,
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    ]
    blocks = [BlockConfig(**b) for b in blocks]
    with deci_x_patcher(t.descriptor, blocks):
        model = tiny_model(model_type, config)
    names = list(model.state_dict())
    groups = t.descriptor.get_weight_groups(names, config.num_hidden_layers)
    assert "block_0_attention" not in groups and "block_0_ffn" in groups
    assert "block_1_ffn" not in groups and "block_1_attention" in groups
    assert "block_3_ffn" not in groups and "block_3_attention" not in groups
    reference = tiny_model(
        model_type, tiny(model_type, num_key_value_heads=1, intermediate_size=64)
    )
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    for name in groups["block_2_attention"] + groups["block_2_ffn"]:
        assert model.state_dict()[name].shape == ref_shapes[name], name
    seen = {}
    layer = model.get_submodule(t.descriptor.layer_block_name(3))
    hook = layer.register_forward_hook(
        lambda _m, args, kwargs, out: seen.update(
            x=args[0] if args else kwargs["hidden_states"], y=out
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=IDS)
    hook.remove()
    y = seen["y"][0] if isinstance(seen["y"], tuple) else seen["y"]
    assert torch.equal(y, seen["x"])


# -- against Model Optimizer's hand-written descriptors ------------------------------------


def _names(model_type, config, device):
    return list(build_model(resolve(model_type).causal_lm_cls, config, device).state_dict())


def _fields(obj):
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_equal_to_model_optimizers_hand_written_descriptor(tree, model_type, tmp_path):
    ours, theirs = tree[model_type], SimpleNamespace(
        descriptor=ModelDescriptorFactory.get(HAND_WRITTEN[model_type]),
        converter=ConverterFactory.get(HAND_WRITTEN[model_type]),
    )
    assert ours.descriptor is not theirs.descriptor
    for method in ("input_embedding_name", "output_embedding_name", "final_norm_name"):
        assert getattr(ours.descriptor, method)() == getattr(theirs.descriptor, method)(), method
    assert ours.descriptor.layer_block_name(7) == theirs.descriptor.layer_block_name(7)
    assert ours.descriptor.decoder_layer_cls() is theirs.descriptor.decoder_layer_cls()
    with quiet_transformers():
        default = resolve(model_type).config_cls()
    for config, device in ((tiny(model_type), "cpu"), (default, "meta")):
        n = config.num_hidden_layers
        names = _names(model_type, config, device)
        mine = {k: sorted(v) for k, v in ours.descriptor.get_weight_groups(names, n).items()}
        hand = {k: sorted(v) for k, v in theirs.descriptor.get_weight_groups(names, n).items()}
        assert mine == hand
        mine_blocks = ours.converter.create_block_configs_from_main_config(config)
        assert mine_blocks == theirs.converter.create_block_configs_from_main_config(config)
        block = BlockConfig(**mine_blocks[0])
        assert ours.descriptor.block_config_to_layer_overrides(
            block
        ) == theirs.descriptor.block_config_to_layer_overrides(block)
    # the no-op plans replace the same children by the same stand-ins
    layer_cls = ours.descriptor.decoder_layer_cls()
    config = tiny(model_type)
    for method in ("attn_no_op_post_init", "mlp_no_op_post_init"):
        a, b = layer_cls(config, 0), layer_cls(config, 0)
        getattr(ours.descriptor, method)(a)
        getattr(theirs.descriptor, method)(b)
        assert {k: type(v) for k, v in a.named_children()} == {
            k: type(v) for k, v in b.named_children()
        }, method


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_layer_descriptors_equal_model_optimizers(tree, model_type):
    hand_module = sys.modules[theirs_module(model_type)]
    mixins = tree[model_type].descriptor.pruning_mixins()
    ours = {
        "FFNIntermediateLayerDescriptor": mixins["ffn_intermediate"].layer_descriptor,
        "KVHeadsLayerDescriptor": mixins["kv_heads"].layer_descriptor,
    }
    compared = 0
    for name, obj in vars(hand_module).items():
        for base, mine in ours.items():
            if isinstance(obj, type) and name.endswith(base) and name != base:
                assert _fields(obj()) == _fields(mine), name
                compared += 1
    assert compared >= 1  # Model Optimizer's qwen2 has an FFN descriptor only; ours adds KV


def theirs_module(model_type):
    descriptor = ModelDescriptorFactory.get(HAND_WRITTEN[model_type])
    return descriptor.__module__


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruning_layer_descriptors_address_the_model(tree, model_type):
    """Model Optimizer's mixins find what our layer descriptors name: its hook targets are each
    layer's output projection, and every weight it slices exists under the prefixes."""
    config = tiny(model_type)
    model = tiny_model(model_type, config)
    state = model.state_dict()
    mixins = tree[model_type].descriptor.pruning_mixins()
    n = config.num_hidden_layers
    ffn = mixins["ffn_intermediate"]
    kv = mixins["kv_heads"]
    for mixin in (ffn, kv):
        hooked = mixin.get_module_names_to_hook(model)
        suffix = mixin.layer_descriptor.module_name_regex()
        assert hooked == [
            (i, f"{tree[model_type].descriptor.layer_block_name(i)}.{suffix}") for i in range(n)
        ]
    down = ffn.layer_descriptor.down_proj_name.rsplit(".", 1)[-1]
    for i in range(n):
        prefix = ffn.layer_descriptor.ffn_prefix(i)
        for name in ffn.layer_descriptor.linear_weight_names:
            assert (
                state[f"{prefix}.{name}.weight"].shape[1 if name == down else 0]
                == config.intermediate_size
            )
        q, k, v, o = (
            f"{kv.layer_descriptor.attn_prefix(i)}.{p}.weight"
            for p in kv.layer_descriptor.qkvo_weight_names
        )
        head_dim = state[q].shape[0] // config.num_attention_heads
        assert state[k].shape[0] == state[v].shape[0] == config.num_key_value_heads * head_dim
        assert state[o].shape[1] == state[q].shape[0]
