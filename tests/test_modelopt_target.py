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
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import generated
from generator import modelopt, render
from generator.cli import main
from generator.errors import PuzzleGenError
from generator.infer import infer
from generator.probe import build_model, quiet_transformers
from generator.source import resolve
from generator.tiny import tiny_config
from puzzletron_runtime import deci_x_patcher

MODEL_TYPES = generated.available()
BY_TYPE = [pytest.param(t, marks=pytest.mark.xdist_group(f"type-{t}"), id=t) for t in MODEL_TYPES]
ROOT = Path(__file__).resolve().parent.parent


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
    """A tiny config (KV heads below the head count, so a converter reading the wrong field
    fails) and the default-size one (built on the meta device)."""
    import generator.tiny as tiny

    source = resolve(model_type)
    default = getattr(tiny, "default_config", lambda cls: cls())  # with its fix-ups, if any
    with quiet_transformers():
        return [
            ("tiny", tiny_config(source.config_cls), "cpu"),
            ("default", default(source.config_cls), "meta"),
        ]


def read_fields(model_type):
    spec = spec_of(model_type)
    return [o.config_field for sb in (spec.attention, spec.ffn) for o in sb.overrides]


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_converter_block_configs_rebuild_every_tensor_shape(model_type):
    package, _ = generated._DESCRIPTORS[model_type]
    if not (ROOT / "generated" / package / f"{package}_converter.py").is_file():
        with pytest.raises(PuzzleGenError, match="no converter"):  # the spec lacks a size
            render.render_converter(spec_of(model_type))
        return
    converter = converter_of(model_type)
    for label, config, device in configs(model_type):
        text = config.get_text_config()
        unset = [f for f in read_fields(model_type) if getattr(text, f, None) is None]
        if unset:  # the modeling code derives the size (n_inner=None: 4 * hidden): not a size
            with pytest.raises(ValueError):
                converter.create_block_configs_from_main_config(config)
            continue
        block_configs = converter.create_block_configs_from_main_config(config)
        assert len(block_configs) == config.get_text_config().num_hidden_layers, label
        assert all(isinstance(b, dict) for b in block_configs)  # config.json form
        original = shapes(build_model(resolve(model_type).causal_lm_cls, config, device))
        assert rebuilt_shapes(model_type, config, block_configs, device) == original, label


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_converter_follows_the_config_it_reads(model_type):
    """Another width and KV-head count in the config give block configs with those sizes."""
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls, intermediate_size=96, num_key_value_heads=1)
    block, *_rest = converter_of(model_type).create_block_configs_from_main_config(config)
    assert block["attention"]["num_key_value_heads"] == 1
    assert block["ffn"]["intermediate_size"] == 96
    assert not block["attention"]["no_op"] and not block["ffn"]["no_op"]


def test_shape_check_catches_a_converter_reading_the_wrong_field():
    """The check above can fail: KV heads read from num_attention_heads build other k/v shapes."""
    _, config, _ = configs("llama")[0]
    good = converter_of("llama").create_block_configs_from_main_config(config)
    wrong = [
        {**b, "attention": {**b["attention"], "num_key_value_heads": config.num_attention_heads}}
        for b in good
    ]
    original = shapes(build_model(resolve("llama").causal_lm_cls, config, "cpu"))
    rebuilt = rebuilt_shapes("llama", config, wrong, "cpu")
    assert rebuilt != original
    assert {k for k in original if rebuilt[k] != original[k]} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("k_proj", "v_proj")
    }


def test_converter_is_rendered_for_the_spec_overrides_only():
    spec = spec_of("llama")
    no_ffn = dataclasses.replace(spec, ffn=dataclasses.replace(spec.ffn, overrides=()))
    with pytest.raises(PuzzleGenError, match="no converter: the ffn subblock"):
        render.render_converter(no_ffn)


def test_nested_text_config_is_read_through_its_attribute():
    spec = dataclasses.replace(spec_of("llama"), text_config_attr="text_config")
    text = render.render_converter(spec)
    assert "text_config = config.text_config\n" in text
    assert "for _ in range(text_config.num_hidden_layers)" in text


# -- target and layout -----------------------------------------------------------------------


def _body_without_imports(text):
    """The source without its import statements, header command line and blank lines."""
    tree = ast.parse(text)
    import_lines = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            import_lines.update(range(node.lineno, node.end_lineno + 1))
    return [
        line
        for i, line in enumerate(text.splitlines(), 1)
        if i not in import_lines and line.strip() and not line.startswith("# Regenerate:")
    ]


def test_modelopt_target_differs_only_in_its_import_block():
    spec = spec_of("mistral")  # a name Model Optimizer does not register: no renaming
    default = render.render_descriptor(spec)
    ours = render.render_descriptor(
        spec, module_for=lambda sub: modelopt.module_for(sub, modelopt.MODELOPT)
    )
    assert default != ours
    assert _body_without_imports(default) == _body_without_imports(ours)
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
    assert (
        main(
            [
                "generate",
                "llama",
                "mistral",
                "--target",
                "modelopt",
                "--layout",
                "modelopt-tree",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    assert files == [
        "models/llama_generated/__init__.py",
        "models/llama_generated/llama_generated_converter.py",
        "models/llama_generated/llama_generated_model_descriptor.py",
        "models/mistral/__init__.py",
        "models/mistral/mistral_converter.py",
        "models/mistral/mistral_model_descriptor.py",
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


def test_generated_default_target_has_a_converter_and_check_covers_it():
    for t in MODEL_TYPES:
        package, _ = generated._DESCRIPTORS[t]
        text = (ROOT / "generated" / package / f"{package}_converter.py").read_text()
        assert "puzzletron_runtime.block_config" in text and "modelopt" not in text


# -- pruning layer descriptors ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_pruning_layer_descriptors_name_real_tensors(model_type):
    """Whatever the names, every tensor a layer descriptor names exists in a tiny model with
    the widths Model Optimizer's mixins slice by; a missing descriptor comes with a reason."""
    spec = spec_of(model_type)
    p = modelopt.infer_pruning(spec)
    assert p.ffn or p.ffn_reason
    assert p.kv_heads or p.kv_reason
    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    state = build_model(source.causal_lm_cls, config, "meta").state_dict()
    text = config.get_text_config()
    if p.ffn:
        width = getattr(text, spec.ffn.overrides[0].config_field)
        prefix = p.ffn.ffn_prefix_name.format(layer_idx=0)
        down = p.ffn.down_proj_name.rsplit(".", 1)[-1]
        for name in p.ffn.linear_weight_names:
            assert state[f"{prefix}.{name}.weight"].shape[1 if name == down else 0] == width
    if p.kv_heads:
        prefix = p.kv_heads.attn_prefix_name.format(layer_idx=0)
        q, k, v, o = (state[f"{prefix}.{n}.weight"] for n in p.kv_heads.qkvo_weight_names)
        assert k.shape == v.shape and o.shape[1] == q.shape[0]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_pruning_layer_descriptors_from_data_flow(model_type):
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
    assert "qkv_proj" in p.kv_reason and "fused" in p.kv_reason
    assert "fused" in p.ffn_reason
    text = render.render_descriptor(
        spec,
        module_for=lambda sub: modelopt.module_for(sub, modelopt.MODELOPT),
        pruning=p,
    )
    body = text[text.index("def pruning_mixins") :]
    assert "No KV-heads pruning: self_attn: 1 projection(s) read its input (qkv_proj)" in body
    assert "return {}" in body
    assert "KVHeadsLayerDescriptor" not in text


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


def test_a_runtime_module_without_a_model_optimizer_counterpart_is_refused():
    with pytest.raises(PuzzleGenError, match="no counterpart of puzzletron_runtime.buffers"):
        modelopt.module_for("buffers", modelopt.MODELOPT)


def test_modelopt_target_dummy_blocks():
    """Attributes the model loop reads (attention_type under transformers 4.57) are set on Model
    Optimizer's DummyBlock after construction; a loop that indexes a tuple is refused."""
    spec = spec_of("llama")
    reads = dataclasses.replace(
        spec, dummy_block=dataclasses.replace(spec.dummy_block, attributes=("attention_type",))
    )
    modelopt.check_renderable(reads, "modelopt")
    text = render.render_descriptor(
        reads,
        module_for=lambda sub: modelopt.module_for(sub, modelopt.MODELOPT),
        pruning=modelopt.infer_pruning(spec),
    )
    assert "from modelopt.torch.puzzletron.utils.dummy_modules import DummyBlock" in text
    assert (
        "        dummy = DummyBlock(block_index=block_index)\n"
        "        dummy.attention_type = original_layer.attention_type\n"
        "        return dummy\n"
    ) in text
    default = render.render_descriptor(reads)
    assert '"attention_type": original_layer.attention_type' in default  # our runtime's kwargs
    tuples = dataclasses.replace(
        spec, dummy_block=dataclasses.replace(spec.dummy_block, returns_tuple=True)
    )
    modelopt.check_renderable(tuples, "puzzletron")
    with pytest.raises(PuzzleGenError, match="DummyBlock returns a tensor"):
        modelopt.check_renderable(tuples, "modelopt")


def test_generate_all_is_the_default_target_only(tmp_path, capsys):
    assert main(["generate", "--all", "--target", "modelopt", "--out", str(tmp_path)]) == 2
    assert "--all writes the default target only" in capsys.readouterr().err
