"""Rendering: deterministic, formatted, and safe against strings from configs and sources."""

import ast
import dataclasses
import re

import black
import pytest

from generator import predicates, render
from generator.errors import InferenceError, PuzzleGenError
from generator.infer import infer
from generator.spec import DescriptorSpec


@pytest.fixture(scope="module")
def spec():
    return infer("llama")


def test_render_is_deterministic_and_black_clean(spec):
    first = render.render_descriptor(spec)
    assert render.render_descriptor(DescriptorSpec.from_json(spec.to_json())) == first
    assert black.format_str(first, mode=render.BLACK_MODE) == first
    ast.parse(first)
    assert max(len(line) for line in first.splitlines()) <= 100


def test_rendered_module_reads_top_to_bottom(spec):
    text = render.render_descriptor(spec)
    tree = ast.parse(text)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = [getattr(n, "module", None) or n.names[0].name for n in imports]
    # stdlib, then third party, then the runtime; each group sorted
    assert modules[:2] == ["re", "typing"]
    assert modules[-3:] == sorted(modules[-3:]) and all(
        m.startswith("puzzletron_runtime") for m in modules[-3:]
    )
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    methods = [f.name for f in cls.body if isinstance(f, ast.FunctionDef)]
    assert methods[:2] == ["decoder_layer_cls", "block_config_to_layer_overrides"]
    assert "layer_name_predicates" in methods
    # one regex alternative per line, escaped
    assert re.search(r"^ +input_layernorm\\\.\.\+\n +\| self_attn\\\.\.\+$", text, re.M)
    assert re.search(r"^ +post_attention_layernorm\\\.\.\+\n +\| mlp\\\.\.\+$", text, re.M)


def test_docstring_states_the_evidence(spec):
    text = render.render_descriptor(spec)
    doc = ast.get_docstring(ast.parse(text))
    assert "input_layernorm -> self_attn" in doc
    assert re.search(r"residual join at modeling_llama\.py:\d+", doc)
    assert "self_attn returns a tuple of 2" in doc


@pytest.mark.parametrize(
    "field,value",
    [
        ("input_embedding", 'model.embed"); import os; ("'),
        ("layer_stack", "model.layers}{"),
        ("class_name", "Bad Name"),
    ],
)
def test_unsafe_strings_never_reach_generated_code(spec, field, value):
    with pytest.raises(PuzzleGenError):
        render.render_descriptor(dataclasses.replace(spec, **{field: value}))


def test_unsafe_regex_alternative_is_refused(spec):
    bad = dataclasses.replace(spec.predicates, attention=('x"""; import os',))
    with pytest.raises(PuzzleGenError, match="regex alternative"):
        render.render_descriptor(dataclasses.replace(spec, predicates=bad))


def test_strict_undefined_fails_on_missing_fields():
    import jinja2

    env = render._env()
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ spec.nope }}").render(spec=object())


def test_pyrepr_only_renders_literals():
    assert render._pyrepr("a'b") == repr("a'b")
    with pytest.raises(PuzzleGenError):
        render._pyrepr(object())


def test_predicates_refuse_names_with_regex_or_quote_characters():
    with pytest.raises(InferenceError):
        predicates.module_alternative('model.x"')
    assert predicates.module_alternative("model.embed_tokens") == r"model\.embed_tokens\..+"


def test_predicate_validation_names_unmatched_and_overlapping_keys():
    pred = predicates.build(["model.embed"], ["lm_head"], "model.layers", ["attn"], ["mlp", "attn"])
    keys = [
        "model.embed.weight",
        "lm_head.weight",
        "model.layers.0.attn.w",
        "model.layers.0.mlp.w",
        "model.other.w",
    ]
    with pytest.raises(InferenceError) as err:
        predicates.validate(pred, keys, 1, "test keys")
    message = str(err.value)
    assert "model.other.w" in message
    assert "model.layers.0.attn.w in block_0_attention and block_0_ffn" in message


def test_layer_predicates_do_not_confuse_layer_1_and_10():
    pred = predicates.build(["e"], ["h"], "model.layers", ["attn"], ["mlp"])
    groups = predicates.compile_groups(pred, 11)
    assert groups["block_1_attention"].match("model.layers.1.attn.w")
    assert not groups["block_1_attention"].match("model.layers.10.attn.w")


def test_spec_json_round_trip(spec):
    again = DescriptorSpec.from_json(spec.to_json())
    assert again == spec
    assert again.fact("layer stack").value == "model.layers"


def test_write_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.py"
    target.write_text("old")

    class Boom(Exception):
        pass

    def explode(*_args, **_kw):
        raise Boom()

    monkeypatch.setattr(render.os, "replace", explode)
    with pytest.raises(Boom):
        render.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.py"]
