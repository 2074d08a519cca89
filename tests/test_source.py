"""Resolving a model type or checkpoint to the classes and config its causal LM is built from."""

import pytest
import torch

from generator.probe import build_model, quiet_transformers
from generator.source import causal_lm_config_class, resolve, resolve_target
from generator.tiny import default_config, tiny_config

# vision-language types whose causal-LM class is text-only ("VLM compatibility" in transformers'
# causal-LM mapping): the class's config class is the type's text sub-config
TEXT_ONLY = ["qwen3_5", "qwen3_5_moe", "qwen4_exp", "llama4", "emu3", "dots3_note", "mllama"]


@pytest.mark.parametrize("model_type", TEXT_ONLY)
def test_a_text_only_causal_lm_of_a_vl_type_gets_the_text_config(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    source = resolve(model_type)
    vl_config = CONFIG_MAPPING[model_type]
    assert source.model_type == model_type
    assert source.config_cls is not vl_config
    assert source.config_cls is vl_config.sub_configs["text_config"]
    assert source.config_cls is source.causal_lm_cls.config_class


@pytest.mark.parametrize("model_type", ["qwen3_5", "llama4"])
def test_its_default_and_tiny_configs_build_the_class(model_type):
    source = resolve(model_type)
    with quiet_transformers():
        build_model(source.causal_lm_cls, default_config(source.config_cls), "meta")
        config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    model = build_model(source.causal_lm_cls, config, "cpu")
    with torch.no_grad():
        model(input_ids=torch.arange(8).unsqueeze(0))


def test_the_rule_is_transformers_own():
    """AutoModelForCausalLM.from_config builds the class from the text config: the same one."""
    from transformers import AutoModelForCausalLM, Qwen3_5Config

    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3_5Config())
    assert type(model.config) is resolve("qwen3_5").config_cls


def test_other_types_keep_their_config_class():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, LlamaConfig

    assert resolve("llama").config_cls is LlamaConfig
    # a VL causal LM built from the whole config keeps it
    assert causal_lm_config_class(Gemma3Config, Gemma3ForConditionalGeneration) is Gemma3Config


def test_a_vl_checkpoint_gives_its_text_config(tmp_path):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    with quiet_transformers():
        config = tiny_config(Qwen3_5Config)
        config.text_config.num_hidden_layers = 4
        build_model(Qwen3_5ForConditionalGeneration, config, "cpu").save_pretrained(tmp_path)
    target = resolve_target(str(tmp_path))
    assert target.model_type == "qwen3_5"
    assert type(target.config) is target.config_cls  # Qwen3_5TextConfig
    assert target.config.hidden_size == config.text_config.hidden_size
    assert target.config.num_hidden_layers == 4


def test_a_config_without_a_layer_count_says_so():
    from generator.errors import InferenceError
    from generator.probe import Probe

    probe = Probe(resolve("blt"))  # its layers are counted in its encoder/global/decoder configs
    with pytest.raises(InferenceError, match="layer count.*BltConfig has no num_hidden_layers"):
        probe.num_layers
