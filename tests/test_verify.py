"""`puzzle-gen verify`: passes on the generated descriptors and catches broken ones."""

import re
from pathlib import Path

import pytest

from generator import cli
from generator.verify import verify_descriptor, verify_model_type
from puzzletron_runtime import MatchingZeros, Same

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama():
    import generated

    return generated.get_descriptor("llama")


@pytest.fixture(scope="module")
def llama_config_cls():
    from transformers import LlamaConfig

    return LlamaConfig


def failed(checks):
    return {c.name for c in checks if not c.ok}


def test_verify_passes_for_a_generated_descriptor():
    checks = verify_model_type("qwen3", REPO / "generated")
    assert [c.name for c in checks] == [
        "names resolve",
        "weight groups partition",
        "heterogeneous shapes",
        "no-op identity",
        "single no-ops",
        "sharded round trip",
    ]
    assert failed(checks) == set(), [c.detail for c in checks if not c.ok]


def test_cli_verify_reports_each_check(capsys):
    assert cli.main(["verify", "llama", "--out", str(REPO / "generated")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ok\s+sharded round trip: heterogeneous checkpoint loads", out)


def test_attention_no_op_without_tuple_is_caught(llama, llama_config_cls):
    class Broken(llama):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.input_layernorm = Same()
            decoder_layer.self_attn = MatchingZeros()  # the layer unpacks two values

    assert "no-op identity" in failed(verify_descriptor(Broken, llama_config_cls))


def test_missing_final_norm_predicate_is_caught(llama, llama_config_cls):
    class Broken(llama):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = llama.layer_name_predicates(num_layers)
            preds["lm_head"] = re.compile(r"^lm_head\..+$")
            return preds

    assert "weight groups partition" in failed(verify_descriptor(Broken, llama_config_cls))


def test_wrong_override_field_is_caught(llama, llama_config_cls):
    class Broken(llama):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"hidden_size": block_config.ffn.intermediate_size}

    assert "heterogeneous shapes" in failed(verify_descriptor(Broken, llama_config_cls))


def test_rotary_not_rebuilt_is_caught(llama, llama_config_cls):
    class Broken(llama):
        @staticmethod
        def init_rotary_embedding(model, runtime):
            pass

    assert "sharded round trip" in failed(verify_descriptor(Broken, llama_config_cls))
