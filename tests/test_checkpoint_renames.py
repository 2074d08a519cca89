"""Prefix renames between the names save_pretrained writes and module names
(generator/checkpoint_renames.py), and the Model Optimizer converter that applies them."""

import ast
import dataclasses

from generator import modelopt
from generator.checkpoint_renames import prefix_renames, rename
from generator.infer import infer

# what transformers 5.14 writes for a Gemma-3-like vision-language model, untied
GEMMA3_ON_DISK = {
    "language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
    "language_model.model.layers.0.mlp.up_proj.weight": "model.language_model.layers.0.mlp.up_proj.weight",
    "language_model.model.norm.weight": "model.language_model.norm.weight",
    "language_model.lm_head.weight": "lm_head.weight",
    "vision_tower.encoder.layers.0.fc1.weight": "model.vision_tower.encoder.layers.0.fc1.weight",
    "multi_modal_projector.mm_input_projection_weight": "model.multi_modal_projector.mm_input_projection_weight",
}


def test_every_checkpoint_name_becomes_its_module_name():
    renames = prefix_renames(GEMMA3_ON_DISK)
    assert {rename(d, renames) for d in GEMMA3_ON_DISK} == set(GEMMA3_ON_DISK.values())
    for disk, module in GEMMA3_ON_DISK.items():
        assert rename(disk, renames) == module, disk
    # longest first: the head's prefix is tried before a shorter one could take it
    assert [len(d) for d, _ in renames] == sorted((len(d) for d, _ in renames), reverse=True)


def test_names_saved_as_they_load_give_no_renames():
    names = {"model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight"}
    assert prefix_renames(names) == ()


def test_a_fusion_on_load_is_not_a_rename_and_spoils_no_other():
    """Per-expert tensors fused into one module tensor on load (Qwen3-Next in transformers
    5.23) share no dotted ending with it: they are left as they are, and the rename the other
    names need is still found."""
    names = {
        "model.layers.0.mlp.experts.0.gate_proj.weight": "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.1.gate_proj.weight": "model.layers.0.mlp.experts.gate_up_proj",
        "backbone.layers.0.norm.weight": "model.layers.0.norm.weight",
    }
    renames = prefix_renames(names)
    assert renames == (("backbone.", "model."),)
    assert rename("model.layers.0.mlp.experts.0.gate_proj.weight", renames).startswith("model.")


def test_a_rename_that_would_misname_another_tensor_is_dropped():
    """`a.x` -> `b.x` would also turn `a.y` (saved as it loads) into `b.y`: refused."""
    names = {"a.x.weight": "b.x.weight", "a.y.weight": "a.y.weight"}
    renames = prefix_renames(names)
    assert all(rename(d, renames) == m for d, m in names.items())


def test_model_optimizer_converter_renames_and_counts_layers_in_the_text_config():
    """The Model Optimizer converter of a nested-config model: `convert_weight_name` applies
    the spec's renames, and `convert` reads the layer count from the text config (Model
    Optimizer's own reads the top-level config's, which such a config lacks)."""
    spec = dataclasses.replace(
        infer("llama"),
        text_config_attr="text_config",
        checkpoint_renames=prefix_renames(GEMMA3_ON_DISK),
    )
    text = modelopt.render_converter(spec, target=modelopt.MODELOPT)
    tree = ast.parse(text)
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    scope = {"Any": object}
    exec(compile(ast.Module([methods["convert_weight_name"]], []), "<m>", "exec"), scope)
    convert_weight_name = scope["convert_weight_name"]  # a staticmethod: callable as it is
    for disk, module in GEMMA3_ON_DISK.items():
        assert convert_weight_name(disk) == module
    assert "num_hidden_layers=config.text_config.num_hidden_layers" in " ".join(
        ast.unparse(methods["convert"]).split()
    )
    flat = dataclasses.replace(spec, text_config_attr=None)
    plain = modelopt.render_converter(flat, target=modelopt.MODELOPT)
    assert "def convert(" not in plain
    default_target = modelopt.render_converter(spec)
    assert "convert_weight_name" not in default_target and "def convert(" not in default_target


def test_gemma3_renames_come_from_what_save_pretrained_writes():
    """Inferred, not listed: every name the tiny Gemma 3 writes (tied and untied) loads by
    name after the renames."""
    from generator.probe import Probe
    from generator.source import resolve

    spec = infer("gemma3")
    probe = Probe(resolve("gemma3"))
    for tie in (True, False):
        model = probe.tiny_model(probe.tiny_config(tie_word_embeddings=tie))
        on_disk = probe.checkpoint_names(model)
        for disk, module in on_disk.items():
            assert rename(disk, spec.checkpoint_renames) == module, disk


def test_a_rename_that_is_not_a_dotted_prefix_is_refused_before_rendering():
    """The renames reach generated code: a spec read back from JSON could carry anything."""
    import pytest

    from generator.spec import SpecError, check_renderable

    spec = infer("llama")
    check_renderable(dataclasses.replace(spec, checkpoint_renames=(("language_model.", ""),)))
    for bad in (("a", "b."), ('a.b"', "c."), (1, "c."), ("x.",)):
        with pytest.raises(SpecError, match="checkpoint rename"):
            check_renderable(dataclasses.replace(spec, checkpoint_renames=(bad,)))
