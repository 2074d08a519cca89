"""Vision-language models: the language model nested in a multimodal one, its vision tower in a
group of its own, image-text-to-text types outside the causal-LM mapping."""

import functools

import pytest
import torch

from generator import predicates
from generator.infer import infer
from generator.source import known_model_types, resolve
from generator.verify import verification_config
from generator.verify.oracle import Reference


@functools.lru_cache(maxsize=None)
def spec_of(model_type):
    return infer(model_type)


def test_the_vision_tower_and_projector_get_a_group_of_their_own():
    spec = spec_of("gemma3")
    assert spec.text_config_attr == "text_config"
    assert spec.layer_stack == "model.language_model.layers"
    assert spec.predicates.encoders[:2] == (
        r"model\.vision_tower\..+",
        r"model\.multi_modal_projector\..+",
    )
    # and as save_pretrained writes them: one alternative per renamed part, not per module
    assert set(spec.predicates.encoders[2:]) == {r"vision_tower\..+", r"multi_modal_projector\..+"}
    groups = predicates.compile_groups(spec.predicates, 2)
    hits = [
        g
        for g, p in groups.items()
        if p.match("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    ]
    assert hits == ["vision_encoding"]
    evidence = spec.fact("model.vision_tower (outside the language model)").evidence
    assert any("never calls it" in e for e in evidence)


def test_a_module_beside_the_base_model_that_runs_stays_with_the_head():
    """ModernBERT-decoder's prediction head runs after the base model: not an encoder."""
    spec = spec_of("modernbert-decoder")
    assert spec.output_embedding == "decoder"
    assert spec.predicates.encoders == ()
    assert r"lm_head\..+" in spec.predicates.lm_head  # its prediction head, before `decoder`


def test_image_text_to_text_types_model_optimizer_supports_are_covered():
    from transformers import AutoModelForImageTextToText

    from puzzletron_runtime.loading import auto_model_class

    assert {"qwen3_vl", "qwen3_vl_moe"} <= set(known_model_types())
    source = resolve("qwen3_vl")
    assert source.causal_lm_cls.__name__ == "Qwen3VLForConditionalGeneration"
    assert auto_model_class(source.config_cls()) is AutoModelForImageTextToText
    spec = spec_of("qwen3_vl")
    assert spec.layer_stack == "model.language_model.layers"
    assert r"model\.visual\..+" in spec.predicates.encoders


def test_the_oracle_demands_only_widths_the_model_builds_as_given():
    """RecurrentGemma halves intermediate_size before use: no block config can write its MLP
    width there, so the oracle does not demand that override; CTRL's `dff` is used as given."""
    from transformers import CTRLConfig, RecurrentGemmaConfig

    assert (
        "ffn.intermediate_size"
        not in Reference(verification_config(RecurrentGemmaConfig)).size_fields
    )
    ctrl = Reference(verification_config(CTRLConfig)).size_fields["ffn.intermediate_size"]
    assert ctrl.field == "dff"


def test_a_stand_in_head_keeps_the_dtype_the_model_reads():
    from puzzletron_runtime.utils.dummy_modules import DummyOutputHead

    head = DummyOutputHead(torch.bfloat16)
    x = torch.ones(2, 3)
    assert head.weight.dtype == torch.bfloat16 and head.weight.numel() == 0
    assert torch.equal(head(x), x)
    assert "weight" not in head.state_dict()  # nothing to load or save
    assert not hasattr(DummyOutputHead(), "weight")
