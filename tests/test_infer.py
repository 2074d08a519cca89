"""Inference on real transformers families, and the probe confirming static findings."""

import re
from types import SimpleNamespace

import pytest
from torch import nn

from generator.analysis.layer_flow import ATTENTION, FFN, LayerFlow, analyze_layer
from generator.analysis.model_structure import StackFinding
from generator.analysis.source_index import SourceIndex
from generator.errors import InferenceError, ProbeMismatch, UnknownModelType
from generator.infer import _other_layer_unit, infer
from generator.layer_kind import _confirm_calls

from generator.probe import CallTrace, Probe, layer_children
from generator.source import resolve


def test_llama_spec_facts_and_evidence():
    spec = infer("llama")
    assert spec.layer_stack == "model.layers"
    (kind,) = spec.kinds
    assert [r.attr for r in kind.attention.replacements] == ["input_layernorm", "self_attn"]
    assert [(r.replacement, r.tuple_size) for r in kind.attention.replacements] == [
        ("Same", None),
        ("MatchingZeros", 2),
    ]
    assert [(o.config_field, o.block_config_attr) for o in spec.overrides] == [
        ("num_key_value_heads", "attention.num_key_value_heads"),
        ("intermediate_size", "ffn.intermediate_size"),
    ]
    assert spec.final_norm == "model.norm"
    assert re.fullmatch(r"transformers/models/llama/modeling_llama\.py:\d+", spec.final_norm_at)
    (rotary,) = spec.rebuilt_buffers
    assert (rotary.module, rotary.buffers, rotary.init_class) == (
        "model.rotary_emb",
        ("inv_freq", "original_inv_freq"),
        "LlamaModel",
    )
    for fact in spec.facts:
        assert fact.evidence, f"{fact.name} has no evidence"


def test_gemma2_norm_placement_follows_data_flow():
    """Gemma 2's post_attention_layernorm normalises the attention output (not the FFN input)."""
    probe = Probe(resolve("gemma2"))
    layer = probe.module("model.layers.0")
    flow = analyze_layer(type(layer), layer, layer_children(layer), SourceIndex())
    assert flow.subblocks[ATTENTION].members == [
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
    ]
    assert flow.subblocks[FFN].members == [
        "pre_feedforward_layernorm",
        "mlp",
        "post_feedforward_layernorm",
    ]


def test_phi_parallel_layout_keeps_shared_modules_in_place():
    spec = infer("phi")
    (kind,) = spec.kinds
    assert kind.layout == "parallel"
    assert "input_layernorm" in kind.shared_modules
    replaced = {r.attr for sb in (kind.attention, kind.ffn) for r in sb.replacements}
    assert "input_layernorm" not in replaced
    assert any("input_layernorm" in alt for alt in spec.predicates.attention)


def test_gpt2_naming_and_width_field():
    spec = infer("gpt2")
    assert spec.layer_stack == "transformer.h"
    assert spec.final_norm == "transformer.ln_f"
    assert spec.input_embedding == "transformer.wte"
    assert r"transformer\.wpe\..+" in spec.predicates.embeddings  # position embedding
    # GPT-2 has no KV-head field
    assert [(o.config_field, o.block_config_attr) for o in spec.overrides] == [
        ("n_inner", "ffn.intermediate_size")
    ]


def test_unknown_model_type_suggests_close_ones():
    with pytest.raises(UnknownModelType) as err:
        resolve("qwen33")
    assert err.value.exit_code == 2
    assert "qwen3" in err.value.close


class _StubProbe:
    def __init__(self, layer, trace):
        self.layer, self.trace = layer, trace

    def module(self, path):
        return self.layer

    def trace_layer(self, path):
        return self.trace


def _flow(called, arity, indexed=None):
    return LayerFlow(
        class_name="Layer",
        layout="sequential",
        subblocks={},
        shared=[],
        arity=arity,
        indexed=indexed or {},
        called=called,
        sites={},
        returns_tuple=False,
        evidence=[],
    )


@pytest.fixture
def layer():
    module = nn.Module()
    module.attn = nn.Linear(2, 2)
    module.mlp = nn.Linear(2, 2)
    return module


def test_probe_disagreeing_on_called_modules_stops_generation(layer):
    ctx = SimpleNamespace(
        probe=_StubProbe(layer, {"attn": CallTrace(1, 2), "mlp": CallTrace(1, None)})
    )
    with pytest.raises(ProbeMismatch) as err:
        _confirm_calls(ctx, _flow(["attn"], {"attn": 2}), "layers.0")
    message = str(err.value)
    assert "static analysis says attn" in message and "a traced forward calls attn, mlp" in message


def test_probe_disagreeing_on_tuple_size_stops_generation(layer):
    ctx = SimpleNamespace(
        probe=_StubProbe(layer, {"attn": CallTrace(1, 3), "mlp": CallTrace(1, None)})
    )
    with pytest.raises(ProbeMismatch, match="a tuple of 2 .* returns 3 values"):
        _confirm_calls(ctx, _flow(["attn", "mlp"], {"attn": 2, "mlp": None}), "layers.0")


def test_trace_decides_the_size_of_an_indexed_tuple(layer):
    ctx = SimpleNamespace(
        probe=_StubProbe(layer, {"attn": CallTrace(1, 3), "mlp": CallTrace(1, None)})
    )
    flow = _flow(["attn", "mlp"], {"attn": None, "mlp": None}, indexed={"attn": True})
    assert _confirm_calls(ctx, flow, "layers.0") == ({"attn": 3, "mlp": None}, frozenset())


def _stack_probe(length):
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(length))
    return SimpleNamespace(module=model.get_submodule)


def _finding(count):
    return StackFinding("layers", ("Layer",), count, "modeling_x.py:10", "self.layers = ...")


def test_a_stack_counted_by_another_field_than_num_hidden_layers_is_named():
    """LongCat-Flash: `range(config.num_layers)` layers, num_hidden_layers = 2 x num_layers."""
    static = [("layers", _finding("range(config.num_layers)"))]
    with pytest.raises(
        InferenceError,
        match=r"layers holds 28 layers, counted by .*num_layers.*"
        r"num_hidden_layers is 56 = 2 x 28",
    ):
        _other_layer_unit(_stack_probe(28), static, 56)
    _other_layer_unit(_stack_probe(28), static, 57)  # not a multiple: the generic mismatch
    _other_layer_unit(_stack_probe(4), [("layers", _finding("config.num_hidden_layers"))], 8)


def test_a_child_traced_returning_a_list_is_reported(layer):
    ctx = SimpleNamespace(
        probe=_StubProbe(layer, {"attn": CallTrace(1, 1, True), "mlp": CallTrace(1, None)})
    )
    flow = _flow(["attn", "mlp"], {"attn": None, "mlp": None}, indexed={"attn": True})
    assert _confirm_calls(ctx, flow, "layers.0") == ({"attn": 1, "mlp": None}, {"attn"})


class _ListAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return [self.proj(x)]


class _ListBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _ListAttention()
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        outputs = self.attn(x)
        h = x + outputs[0]
        return [h + self.mlp(h)] + outputs[1:]


class _ListModel(nn.Module):
    def __init__(self):
        super().__init__()
        text = SimpleNamespace(vocab_size=8)
        self.config = SimpleNamespace(get_text_config=lambda: text)
        self.embed = nn.Embedding(8, 4)
        self.h = nn.ModuleList([_ListBlock()])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.h:
            x = block(x)[0]
        return x


def test_trace_records_which_children_return_a_list(monkeypatch):
    probe = object.__new__(Probe)
    monkeypatch.setattr(probe, "tiny_model", lambda: _ListModel(), raising=False)
    trace = probe.trace_layer("h.0")
    assert trace["attn"] == CallTrace(1, 1, True)
    assert trace["mlp"] == CallTrace(1, None, False)


def test_a_linear_between_widths_in_a_removed_subblock_gets_zeros_of_its_output_width():
    """Gemma 4's per-layer input gate (hidden -> narrower) and projection (back): `Same` or
    `MatchingZeros` would hand what reads them a tensor of the wrong width; a square linear
    (or any other module) keeps the plain stand-ins."""
    from torch import nn as tnn

    from generator.layer_kind import _width_changing_linear

    layer = tnn.Module()
    layer.gate = tnn.Linear(8, 3)
    layer.square = tnn.Linear(8, 8)
    layer.norm = tnn.LayerNorm(8)
    assert _width_changing_linear([layer], "gate") == (8, 3)
    assert _width_changing_linear([layer], "square") is None
    assert _width_changing_linear([layer], "norm") is None
    assert _width_changing_linear([layer], "missing") is None
