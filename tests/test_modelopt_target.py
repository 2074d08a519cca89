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
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

import generated
from generator import modelopt, render
from generator.cli import main
from generator.errors import PuzzleGenError
from generator.infer import infer
from generator.probe import build_model, quiet_transformers
from generator.source import resolve
from generator.tiny import default_config, tiny_config
from puzzletron_runtime import deci_x_patcher

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
    reading the wrong field fails) and the default-size one, both built on the meta device."""
    source = resolve(model_type)
    with quiet_transformers():
        return [
            ("tiny", tiny_config(source.config_cls), "meta"),
            ("default", default_config(source.config_cls), "meta"),
        ]


def render_modelopt(spec, pruning=NO_PRUNING, layout="package"):
    cmd = modelopt.command(spec, None, "modelopt", layout)
    target = modelopt.descriptor_target(spec, layout, pruning, cmd)
    return render.render_descriptor(modelopt.target_spec(spec, "modelopt"), None, target)


# -- converters --------------------------------------------------------------------------------


def test_every_verified_type_has_a_converter_that_check_covers():
    for t in VERIFIED:
        package, _ = generated._DESCRIPTORS[t]
        text = (ROOT / "generated" / package / f"{package}_converter.py").read_text()
        assert "puzzletron_runtime.block_config" in text and "modelopt" not in text
        assert "Regenerate: puzzle-gen generate" in text  # the header `check` regenerates from


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_converter_block_configs_rebuild_every_tensor_shape(model_type):
    converter = converter_of(model_type)
    for label, config, device in configs(model_type):
        block_configs = converter.create_block_configs_from_main_config(config)
        text = config.get_text_config()
        assert len(block_configs) == text.num_hidden_layers, label
        for b in block_configs:  # config.json form, every size Model Optimizer asserts on
            assert isinstance(b["attention"]["num_key_value_heads"], int), label
            assert isinstance(b["ffn"]["intermediate_size"], int), label
        original = shapes(build_model(resolve(model_type).causal_lm_cls, config, device))
        assert rebuilt_shapes(model_type, config, block_configs, device) == original, label


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_converter_kv_heads_are_the_heads_of_the_key_value_cache(model_type):
    """What Model Optimizer counts as KV heads (KV-cache memory, KV-head pruning) is the head
    dimension of the cache a forward fills."""
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    model = build_model(source.causal_lm_cls, config, "cpu")
    ids = torch.arange(6).unsqueeze(0) % config.get_text_config().vocab_size
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    block, *_ = converter_of(model_type).create_block_configs_from_main_config(config)
    assert block["attention"]["num_key_value_heads"] == cache.layers[0].keys.shape[1]


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_converter_follows_the_fields_the_overrides_write(model_type):
    """Another value of each overridden config field gives block configs with that value."""
    source = resolve(model_type)
    converter = converter_of(model_type)
    spec = spec_of(model_type)
    for kind in modelopt.SUBBLOCK_KINDS:
        for o in modelopt.spec_overrides(spec, kind):
            _, attr = o.block_config_attr.split(".")
            value = 1 if attr == "num_key_value_heads" else 48
            with quiet_transformers():
                config = tiny_config(source.config_cls, **{o.config_field: value})
            block = converter.create_block_configs_from_main_config(config)[0]
            assert block[kind][attr] == value, o.config_field
            assert not block[kind]["no_op"]


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


def test_a_derived_width_must_build_the_models_shapes():
    """GPT-2 leaves n_inner to the modeling code (None: 4 x hidden); the rule is confirmed by
    building, so a wrong one is refused."""
    probe = modelopt._SizeProbe(spec_of("gpt2"))
    expr, _ = probe.ffn_width_rule("n_inner")
    hidden = probe.default.get_text_config().hidden_size
    assert probe.evaluate(expr, probe.default.get_text_config()) == 4 * hidden
    original = modelopt._SizeProbe.ffn_dims
    probe.ffn_dims = lambda config: {d + 1 for d in original(probe, config)}  # a wrong width
    with pytest.raises(PuzzleGenError):
        probe.ffn_width_rule("n_inner")


def test_a_missing_size_without_a_rule_means_no_converter():
    spec = spec_of("llama")
    no_ffn = dataclasses.replace(spec, ffn=dataclasses.replace(spec.ffn, overrides=()))
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


def test_inline_rebuild_refuses_to_leave_a_buffer_unset():
    """The check can fail: without the _init_weights call the helper raises instead of leaving
    NaN in the rotary tables."""
    helper = inline_helper(render_modelopt(spec_of("llama")), sabotage="_init_weights")
    _, model = meta_loaded("llama")
    with pytest.raises(RuntimeError, match="did not rebuild"):
        helper(model, torch.device("cpu"))


# -- target and layout -----------------------------------------------------------------------


MODELOPT_ONLY = {"_rebuild_buffers", "_TupleDummyBlock"}


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
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
            continue
        body.append(node)
    dump = ast.dump(ast.Module(body, []))
    return dump.replace("'_rebuild_buffers'", "'rebuild_buffers'") if modelopt_target else dump


@pytest.mark.parametrize("model_type", ["mistral", "gptj", "gemma"])
def test_modelopt_target_differs_only_in_imports_and_its_additions(model_type):
    spec = spec_of(model_type)  # mistral, gptj, gemma: names Model Optimizer does not register
    default = render.render_descriptor(spec)
    ours = render_modelopt(spec)
    assert default != ours
    assert _comparable(default, False) == _comparable(ours, True)
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
        "        return dummy\n"
    ) in text
    default = render.render_descriptor(reads)
    assert '"attention_type": original_layer.attention_type' in default  # our runtime's kwargs
    tuples = render_modelopt(spec_of("gptj"))
    assert "class _TupleDummyBlock(DummyBlock):" in tuples
    assert "dummy = _TupleDummyBlock(block_index=block_index)" in tuples


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
