"""`puzzle-gen verify` and the oracle it stands on.

The mutant suite (test_verify_mutants.py) shows broken descriptors failing; these tests show the
oracle's own facts are observed from the reference model, and that the command reports each
check with what it compared against.
"""

import re
from pathlib import Path

import pytest
import torch

from generator import cli
from generator.verify import CHECKS, Reference, verification_config, verify_model_type
from generator.verify.models import layer_io

REPO = Path(__file__).resolve().parent.parent


def test_verify_runs_every_check_and_passes_a_generated_descriptor():
    checks = verify_model_type("qwen3", REPO / "generated")
    assert [c.name for c in checks] == [c.name for c in CHECKS]
    assert [c.detail for c in checks if not c.ok] == []
    assert all(c.reference for c in checks)


def test_cli_verify_prints_each_check_and_what_it_compared_against(capsys):
    assert cli.main(["verify", "llama", "--out", str(REPO / "generated")]) == 0
    out = capsys.readouterr().out
    for check in CHECKS:
        assert re.search(rf"ok\s+{re.escape(check.name)}: ", out)
        assert f"against: {check.reference}" in out


def test_cli_verify_exits_1_naming_the_failed_check(tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli.main(["generate", "llama", "--out", str(out)]) == 0
    module = out / "llama" / "llama_model_descriptor.py"
    text = module.read_text()
    broken = text.replace('return "model.norm"', 'return "model.layers.0.input_layernorm"')
    assert broken != text
    module.write_text(broken)
    assert cli.main(["verify", "llama", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert re.search(
        r"FAIL names: final_norm_name\(\) is 'model.layers.0.input_layernorm'", printed.out
    )
    assert re.search(r"puzzle-gen verify: \d+ check\(s\) failed", printed.err)


@pytest.fixture(scope="module")
def gemma2_reference():
    from transformers import Gemma2Config

    return Reference(verification_config(Gemma2Config))


@pytest.fixture(scope="module")
def phi_reference():
    from transformers import PhiConfig

    return Reference(verification_config(PhiConfig))


def test_oracle_places_gemma2_post_attention_norm_in_attention(gemma2_reference):
    """Names lie: Gemma 2's post_attention_layernorm normalises the attention output."""
    roles = gemma2_reference.roles(0)
    assert roles.cores == {"self_attn": "attention", "mlp": "ffn"}
    assert roles.members["attention"] == {
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
    }
    assert roles.members["ffn"] == {
        "pre_feedforward_layernorm",
        "mlp",
        "post_feedforward_layernorm",
    }
    assert not roles.shared


def test_oracle_finds_phi_shared_norm_and_final_norm(phi_reference):
    roles = phi_reference.roles(2)
    assert roles.shared == {"input_layernorm"}
    assert phi_reference.final_norms == ["model.final_layernorm"]
    assert phi_reference.stack_path == "model.layers"
    assert phi_reference.before_stack == {"model.embed_tokens.weight"}
    assert phi_reference.after_stack == {
        "model.final_layernorm.weight",
        "model.final_layernorm.bias",
        "lm_head.weight",
        "lm_head.bias",
    }


def test_zeroing_both_subblocks_of_the_reference_is_the_identity(phi_reference):
    ref = phi_reference
    x, y = layer_io(ref.model, ref.layer(1), ref.input_ids, ref.zeroed(1, ("attention", "ffn")))
    assert torch.equal(x, y)
    x, y = layer_io(ref.model, ref.layer(1), ref.input_ids, ref.zeroed(1, "attention"))
    assert not torch.equal(x, y)  # the MLP still contributes


def test_oracle_size_fields_come_from_shapes(phi_reference):
    fields = phi_reference.size_fields
    assert fields["ffn.intermediate_size"].field == "intermediate_size"
    assert fields["attention.num_key_value_heads"].field == "num_key_value_heads"


def test_gpt2_width_left_to_default_is_made_concrete():
    from transformers import GPT2Config

    config = verification_config(GPT2Config)
    assert isinstance(config.n_inner, int)
    assert Reference(config).size_fields["ffn.intermediate_size"].field == "n_inner"


def test_oracle_demands_expert_overrides_and_accepts_them(tmp_path):
    """An MoE layer's expert count and width are block-config sizes: a descriptor that ignores
    them fails `overrides`; one that maps them onto the fields the experts read passes."""
    from transformers import Qwen3MoeConfig

    from generator.verify import CHECKS, load_descriptor, make_subject, run_check

    out = tmp_path / "gen"
    assert cli.main(["generate", "qwen3_moe", "--out", str(out)]) == 0
    base = load_descriptor("qwen3_moe", out)

    class DenseOnly(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"num_key_value_heads": block_config.attention.num_key_value_heads}

    class ExpertSizesOnly(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            moe = block_config.ffn.moe
            return {
                "num_key_value_heads": block_config.attention.num_key_value_heads,
                "num_experts": moe.num_local_experts if moe else None,
                "moe_intermediate_size": moe.expert_intermediate_dim if moe else None,
            }

    class WithExperts(ExpertSizesOnly):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            moe = block_config.ffn.moe
            return {
                **ExpertSizesOnly.block_config_to_layer_overrides(block_config),
                "num_experts_per_tok": moe.num_experts_per_tok if moe else None,
            }

    overrides = next(c for c in CHECKS if c.name == "overrides")
    small = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    subject = make_subject(DenseOnly, Qwen3MoeConfig, **small)
    result = run_check(subject, overrides)
    assert not result.ok and "no override for ffn.moe." in result.detail
    # the routing count changes no shape, only the logits: ignoring it fails too
    subject.descriptor = ExpertSizesOnly
    result = run_check(subject, overrides)
    assert not result.ok and "ffn.moe.num_experts_per_tok" in result.detail
    subject.descriptor = WithExperts
    result = run_check(subject, overrides)
    assert result.ok, result.detail
    assert "ffn.moe.num_local_experts -> config.num_local_experts" in result.detail
    assert "ffn.moe.expert_intermediate_dim -> config.moe_intermediate_size" in result.detail


def test_oracle_finds_cores_that_add_the_residual_they_are_passed():
    """Bloom passes the residual into its attention and MLP, which add it themselves: their
    contribution is their output minus that residual, so "zeroed" means returning it."""
    from transformers import BloomConfig

    ref = Reference(verification_config(BloomConfig))
    cores = ref.roles_cores(1)
    assert cores == {"self_attention": "attention", "mlp": "ffn"}
    assert all(ref.adds_passed_stream(1, name) is not None for name in cores)
    x, y = layer_io(ref.model, ref.layer(1), ref.input_ids, ref.zeroed(1, ("attention", "ffn")))
    assert torch.equal(x, y)
    assert ref.roles(1).members["attention"] == {"input_layernorm", "self_attention"}


def test_an_ordinary_core_adds_nothing_it_is_passed(phi_reference):
    assert phi_reference.adds_passed_stream(1, "self_attn") is None
    assert phi_reference.adds_passed_stream(1, "mlp") is None


@pytest.mark.parametrize(
    "model_type, norm",
    [
        ("olmo", "model.norm"),  # a LayerNorm without weights
        ("nanochat", "model.norm"),  # one module norms the embeddings and the last layer
        ("opt", "model.decoder.final_layer_norm"),
    ],
)
def test_final_norm_is_found_by_what_it_does(model_type, norm):
    from generator.source import resolve

    ref = Reference(verification_config(resolve(model_type).config_cls))
    assert ref.final_norms == [norm]


def test_an_ffn_width_under_another_name_is_found_by_its_shapes():
    from transformers import CTRLConfig

    field = Reference(verification_config(CTRLConfig)).size_fields["ffn.intermediate_size"]
    assert field.field == "dff"


def test_the_token_mixer_is_found_by_what_it_mixes_not_by_the_context_it_is_given():
    """OpenAI-GPT calls its attention with attention_mask=None and nothing else: by context
    alone it would look position-wise. Shifting one position's input moves the attention's
    later outputs and not the MLP's."""
    from transformers import OpenAIGPTConfig

    from generator.verify import verification_config

    ref = Reference(verification_config(OpenAIGPTConfig))
    layer = ref.layer(0)
    assert ref._mixes_tokens(0, layer.attn) is True
    assert ref._mixes_tokens(0, layer.mlp) is False
    assert ref.roles_cores(0) == {"attn": "attention", "mlp": "ffn"}


def test_a_core_that_refines_its_input_takes_the_kind_of_the_core_feeding_it():
    """Inkling follows its attention and its MLP with a short causal convolution that adds its
    input to its output. The convolution mixes tokens, so by itself every segment would be the
    attention; with its weights zeroed it is the identity, so the MLP before it decides."""
    from generator.source import resolve

    ref = Reference(verification_config(resolve("inkling_text").config_cls))
    layer = ref.layer(0)
    assert ref._refines(0, layer.mlp_sconv) and ref._refines(0, layer.attn_sconv)
    assert not ref._refines(0, layer.mlp) and not ref._refines(0, layer.self_attn)
    assert ref.roles_cores(0) == {"attn_sconv": "attention", "mlp_sconv": "ffn"}
    assert ref.roles(0).members["ffn"] == {"mlp", "mlp_sconv", "post_attention_layernorm"}


def test_a_block_holding_its_own_residual_is_not_judged_by_the_block_before_it():
    """CPM-Ant's layer chains two blocks that each add their input to their output: the FFN
    block is fed the attention block's output, but that one refines its input too, so the FFN
    block is judged by what it mixes itself (nothing: position-wise)."""
    from transformers import CpmAntConfig

    ref = Reference(verification_config(CpmAntConfig))
    layer = ref.layer(0)
    assert ref._refines(0, layer.ffn) and ref._refines(0, layer.self_att)
    assert ref.roles_cores(0)["ffn"] == "ffn"


def test_a_forward_run_through_a_layer_stops_there_and_sees_what_a_whole_one_sees():
    """The oracle's questions about layer i stop the forward once layer i returns: the layers
    after it never run, and layer i's input and output are those of a whole forward."""
    from transformers import LlamaConfig

    from generator.verify import verification_config
    from generator.verify.models import hooks, layer_io, run_through

    ref = Reference(verification_config(LlamaConfig))
    calls = []
    last = ref.layer(ref.num_layers - 1)
    with hooks(last.register_forward_hook(lambda *_: calls.append(1))):
        run_through(ref.model, ref.layer(1), ref.input_ids)
        assert calls == []
        stopped = layer_io(ref.model, ref.layer(1), ref.input_ids)
        assert calls == []
        whole = layer_io(ref.model, ref.layer(1), ref.input_ids, whole=True)
        assert calls == [1]
    assert torch.equal(stopped[0], whole[0]) and torch.equal(stopped[1], whole[1])


def test_oracle_reads_through_a_child_handing_on_two_streams():
    """A child that returns the residual stream and the FFN's normed input (DBRX's
    norm_attn_norm) is part of both subblocks: the oracle takes its children as the layer's
    units, so its first norm goes with the attention and its second with the FFN. Without the
    rule the whole child is one core, of neither subblock alone."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    import synthetic_models as sm

    config = sm.make_config(vocab_size=16)
    config.get_text_config = lambda: config
    torch.manual_seed(0)
    model = sm.NestedReference(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norms off 1, so scaling them shows
    ref = Reference(config, model=model)
    assert [n for n, _ in ref.units(0)] == [
        "norm_attn_norm.norm_1",
        "norm_attn_norm.attn",
        "norm_attn_norm.norm_2",
        "ffn",
    ]
    roles = ref.roles(0)
    assert roles.cores == {"norm_attn_norm.attn": "attention", "ffn": "ffn"}
    assert roles.members["attention"] == {"norm_attn_norm.norm_1", "norm_attn_norm.attn"}
    assert roles.members["ffn"] == {"norm_attn_norm.norm_2", "ffn"}
    assert roles.shared == frozenset()


def test_oracle_finds_sizes_in_sub_configs_and_stacked_expert_widths():
    """DBRX keeps its sizes in attn_config / ffn_config, and its expert tensors stack every
    expert's rows (w1: experts x width): the oracle offers sub-config fields and takes a width
    built as width x experts. Without either it finds no KV-head field and no expert width."""
    from transformers import DbrxConfig

    sizes = Reference(verification_config(DbrxConfig)).size_fields
    assert sizes["attention.num_key_value_heads"].field == "attn_config.kv_n_heads"
    assert sizes["ffn.moe.num_local_experts"].field == "ffn_config.moe_num_experts"
    assert sizes["ffn.moe.expert_intermediate_dim"].field == "ffn_config.ffn_hidden_size"


def test_a_config_refusing_tied_embeddings_has_no_tied_variant():
    """DbrxConfig validates tie_word_embeddings away: the checks run without a tied variant and
    say why, instead of failing to build the subject at all."""
    from transformers import DbrxConfig

    from generator.verify import make_subject

    s = make_subject(None, DbrxConfig)
    assert s.tied_config is None
    assert "tie_word_embeddings is not supported" in s.tied_refused
    assert s.config.tie_word_embeddings is False
