"""The oracle catches broken descriptors: each mutant fails `verify` with the right check.

Mutants are subclasses of a real generated descriptor (llama, sequential; phi, parallel, generated
into a temp dir here) that each get one thing wrong, the way a hand-written descriptor does.
The unmutated descriptors pass every check.
"""

import copy
import re

import pytest

from generator import cli
from generator.source import resolve
from generator.verify import CHECKS, load_descriptor, make_subject, run_check, verify_descriptor
from puzzletron_runtime import MatchingZeros, ModelDescriptor, Same, return_tuple_of_size

pytestmark = pytest.mark.xdist_group("mutants")  # one worker builds the subjects once
# sequential, parallel, residual-in-subblock; several layer kinds; experts; a vision tower
TYPES = ("llama", "phi", "bloom", "nemotron_h", "mixtral", "gemma3")


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen"
    assert cli.main(["generate", *TYPES, "--out", str(out)]) == 0
    return {t: load_descriptor(t, out) for t in TYPES}


@pytest.fixture(scope="module")
def subjects(descriptors):
    """One subject per model type: its reference model is built once and shared by mutants."""
    return {t: make_subject(d, resolve(t).config_cls) for t, d in descriptors.items()}


def failed(descriptor, model_type):
    checks = verify_descriptor(descriptor, resolve(model_type).config_cls)
    return {c.name: c.detail for c in checks if not c.ok}


# -- llama (sequential) -------------------------------------------------------------------------
def llama_norm_in_ffn(base):
    """input_layernorm moved into the FFN subblock, consistently in no-ops and groups."""

    class M(base):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.self_attn = return_tuple_of_size(MatchingZeros, size=2)()

        @staticmethod
        def mlp_no_op_post_init(decoder_layer):
            decoder_layer.input_layernorm = Same()
            decoder_layer.post_attention_layernorm = Same()
            decoder_layer.mlp = MatchingZeros()

        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            for i in range(num_layers):
                p = rf"^model\.layers\.{i}\."
                preds[f"block_{i}_attention"] = re.compile(p + r"self_attn\..+$")
                preds[f"block_{i}_ffn"] = re.compile(
                    p + r"(?:input_layernorm|post_attention_layernorm|mlp)\..+$"
                )
            return preds

    return M


def llama_final_norm_in_layer(base):
    class M(base):
        @staticmethod
        def final_norm_name():
            return "model.layers.0.post_attention_layernorm"

    return M


def llama_attn_no_op_keeps_norm(base):
    """The attention no-op replaces self_attn but leaves input_layernorm in place."""

    class M(base):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.self_attn = return_tuple_of_size(MatchingZeros, size=2)()

    return M


def llama_mlp_no_op_keeps_norm(base):
    class M(base):
        @staticmethod
        def mlp_no_op_post_init(decoder_layer):
            decoder_layer.mlp = MatchingZeros()

    return M


def llama_no_kv_override(base):
    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"intermediate_size": block_config.ffn.intermediate_size}

    return M


def llama_no_ffn_override(base):
    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"num_key_value_heads": block_config.attention.num_key_value_heads}

    return M


def llama_head_with_embedding(base):
    """The LM head's tensors grouped with the input embedding."""

    class M(base):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            preds["embeddings"] = re.compile(r"^(?:model\.embed_tokens|lm_head)\..+$")
            preds["lm_head"] = re.compile(r"^model\.norm\..+$")
            return {"embeddings": preds.pop("embeddings"), **preds}

    return M


def llama_layer_off_by_one(base):
    class M(base):
        @staticmethod
        def layer_block_name(index):
            return f"model.layers.{index + 1}"

    return M


def llama_no_op_core_is_same(base):
    """The FFN no-op passes its input through instead of contributing zeros."""

    class M(base):
        @staticmethod
        def mlp_no_op_post_init(decoder_layer):
            decoder_layer.post_attention_layernorm = Same()
            decoder_layer.mlp = Same()

    return M


def llama_no_tuple(base):
    class M(base):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.input_layernorm = Same()
            decoder_layer.self_attn = MatchingZeros()  # the layer unpacks two values

    return M


def llama_override_wrong_field(base):
    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {
                "num_key_value_heads": block_config.attention.num_key_value_heads,
                "hidden_size": block_config.ffn.intermediate_size,
            }

    return M


def llama_swapped_overrides(base):
    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {
                "num_attention_heads": block_config.attention.num_key_value_heads,
                "intermediate_size": block_config.ffn.intermediate_size,
            }

    return M


def llama_rotary_not_rebuilt(base):
    class M(base):
        @staticmethod
        def init_rotary_embedding(model, runtime):
            pass

    return M


def llama_missing_final_norm_group(base):
    class M(base):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            preds["lm_head"] = re.compile(r"^lm_head\..+$")
            return preds

    return M


def llama_mlp_in_attention_group(base):
    """Each layer's MLP grouped with its attention (the no-ops left right)."""

    class M(base):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            for i in range(num_layers):
                p = rf"^model\.layers\.{i}\."
                preds[f"block_{i}_attention"] = re.compile(
                    p + r"(?:input_layernorm|self_attn|mlp)\..+$"
                )
                preds[f"block_{i}_ffn"] = re.compile(p + r"post_attention_layernorm\..+$")
            return preds

    return M


# -- phi (parallel: attention and MLP read one shared input_layernorm) ------------------------------
def phi_attn_no_op_drops_shared_norm(base):
    class M(base):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.input_layernorm = Same()
            decoder_layer.self_attn = return_tuple_of_size(MatchingZeros, size=2)()

    return M


def phi_mlp_no_op_drops_shared_norm(base):
    class M(base):
        @staticmethod
        def mlp_no_op_post_init(decoder_layer):
            decoder_layer.input_layernorm = Same()
            decoder_layer.mlp = MatchingZeros()

    return M


def phi_attention_dense_in_ffn_group(base):
    """Attention's output projection (self_attn.dense) grouped with the FFN."""

    class M(base):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            for i in range(num_layers):
                p = rf"^model\.layers\.{i}\."
                preds[f"block_{i}_ffn"] = re.compile(p + r"(?:mlp|self_attn\.dense)\..+$")
                preds[f"block_{i}_attention"] = re.compile(
                    p + r"(?:input_layernorm|self_attn\.(?!dense\.)[^.]+)\..+$"
                )
            return {
                k: preds[k]
                for k in ["embeddings", "lm_head"]
                + [f"block_{i}_{s}" for i in range(num_layers) for s in ("ffn", "attention")]
            }

    return M


def phi_no_final_norm(base):
    class M(base):
        @staticmethod
        def final_norm_name():
            return None

    return M


def phi_no_ffn_override(base):
    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"num_key_value_heads": block_config.attention.num_key_value_heads}

    return M


# -- bloom (its attention and MLP add the residual they are passed) ----------------------------
def bloom_mlp_no_op_returns_zeros(base):
    """The MLP no-op returns zeros, as for Llama, though Bloom's MLP adds the residual itself:
    the layer then drops its residual stream."""

    class M(base):
        @staticmethod
        def mlp_no_op_post_init(decoder_layer):
            decoder_layer.post_attention_layernorm = Same()
            decoder_layer.mlp = MatchingZeros()

    return M


# -- nemotron_h (four layer kinds of one class, one subblock each) ------------------------------
def nemotron_h_norm_stays_with_attention(base):
    """No move of the norm to an MLP / expert layer's only subblock: the predicates alone."""

    class M(base):
        get_weight_groups = classmethod(ModelDescriptor.get_weight_groups.__func__)

    return M


def nemotron_h_attention_no_op_on_every_kind(base):
    """The attention no-op of the Mamba layers applied to every layer, MLP and experts too."""

    class M(base):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            decoder_layer.norm = Same()
            decoder_layer.mixer = MatchingZeros()

    return M


# -- mixtral (experts) --------------------------------------------------------------------------
def mixtral_expert_width_as_dense_width(base):
    """The experts' width read from ffn.intermediate_size, as for a dense MLP."""

    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            out = dict(base.block_config_to_layer_overrides(block_config))
            out["intermediate_size"] = block_config.ffn.intermediate_size
            return out

    return M


def mixtral_no_routing_override(base):
    """ffn.moe.num_experts_per_tok ignored: it changes no shape, only which experts run."""

    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            out = dict(base.block_config_to_layer_overrides(block_config))
            out.pop("num_experts_per_tok", None)
            return out

    return M


# -- gemma3 (a vision tower beside the language model) ------------------------------------------
def gemma3_vision_with_embeddings(base):
    """The vision tower and projector grouped with the token embedding."""

    class M(base):
        @staticmethod
        def layer_name_predicates(num_layers):
            preds = dict(base.layer_name_predicates(num_layers))
            vision = preds.pop("vision_encoding")
            embeddings = preds["embeddings"]
            preds["embeddings"] = re.compile(
                f"(?:{embeddings.pattern})|(?:{vision.pattern})", re.VERBOSE
            )
            return preds

    return M


MUTANTS = [
    ("llama", llama_norm_in_ffn, "no-ops"),
    ("llama", llama_norm_in_ffn, "weight groups"),
    ("llama", llama_final_norm_in_layer, "names"),
    ("llama", llama_attn_no_op_keeps_norm, "no-ops"),
    ("llama", llama_mlp_no_op_keeps_norm, "no-ops"),
    ("llama", llama_no_kv_override, "overrides"),
    ("llama", llama_no_ffn_override, "overrides"),
    ("llama", llama_head_with_embedding, "weight groups"),
    ("llama", llama_layer_off_by_one, "names"),
    ("llama", llama_no_op_core_is_same, "no-ops"),
    ("llama", llama_no_tuple, "no-ops"),
    ("llama", llama_override_wrong_field, "identity"),
    ("llama", llama_override_wrong_field, "overrides"),
    ("llama", llama_swapped_overrides, "overrides"),
    ("llama", llama_rotary_not_rebuilt, "sharded stages"),
    ("llama", llama_missing_final_norm_group, "weight groups"),
    ("llama", llama_mlp_in_attention_group, "weight groups"),
    ("llama", llama_mlp_in_attention_group, "no-ops"),
    ("phi", phi_attn_no_op_drops_shared_norm, "no-ops"),
    ("phi", phi_mlp_no_op_drops_shared_norm, "no-ops"),
    ("phi", phi_attention_dense_in_ffn_group, "weight groups"),
    ("phi", phi_no_final_norm, "names"),
    ("phi", phi_no_ffn_override, "overrides"),
    ("bloom", bloom_mlp_no_op_returns_zeros, "no-ops"),
    ("nemotron_h", nemotron_h_norm_stays_with_attention, "weight groups"),
    ("nemotron_h", nemotron_h_attention_no_op_on_every_kind, "no-ops"),
    ("mixtral", mixtral_expert_width_as_dense_width, "overrides"),
    ("mixtral", mixtral_no_routing_override, "overrides"),
    ("gemma3", gemma3_vision_with_embeddings, "weight groups"),
]


@pytest.mark.parametrize(
    "model_type, mutate, check",
    MUTANTS,
    ids=[f"{m.__name__}-{c.replace(' ', '_')}" for _, m, c in MUTANTS],
)
def test_mutant_fails_the_right_check(descriptors, subjects, model_type, mutate, check):
    subject = copy.copy(subjects[model_type])  # shares the reference model already built
    subject.descriptor = mutate(descriptors[model_type])
    result = run_check(subject, next(c for c in CHECKS if c.name == check))
    assert not result.ok, f"{mutate.__name__} passed {check!r}: {result.detail}"
    print(f"{mutate.__name__}: {check}: {result.detail}")


@pytest.mark.parametrize("model_type", TYPES)
def test_unmutated_descriptor_passes(descriptors, model_type):
    assert failed(descriptors[model_type], model_type) == {}


def test_a_buffer_left_wrong_after_loading_is_caught(descriptors, subjects):
    """A rotary rebuilt with other frequencies gives a model that runs, with other buffers."""
    base = descriptors["llama"]

    class WrongTheta(base):
        @staticmethod
        def init_rotary_embedding(model, runtime):
            base.init_rotary_embedding(model, runtime)
            rotary = model.model.rotary_emb
            rotary.inv_freq = rotary.inv_freq * 2

    subject = copy.copy(subjects["llama"])
    subject.descriptor = WrongTheta
    result = run_check(subject, next(c for c in CHECKS if c.name == "sharded stages"))
    assert not result.ok and "buffer model.rotary_emb.inv_freq differs" in result.detail


def test_a_layer_of_the_same_kind_left_at_its_size_fails_overrides(descriptors, subjects):
    """Inkling's sliding layers read their KV heads from another field than its full layers
    (one layer kind): an override that resizes the first layer of a kind must resize every
    layer of it. Here the last layer of each build keeps its heads, as such a layer does."""
    subject = copy.copy(subjects["llama"])
    n = subject.reference.num_layers
    base = descriptors["llama"]
    calls = iter(range(10**6))

    class M(base):
        @staticmethod
        def block_config_to_layer_overrides(block_config):
            out = dict(base.block_config_to_layer_overrides(block_config))
            if next(calls) % n == n - 1:  # one override call per layer, in layer order
                out.pop("num_key_value_heads")
            return out

    subject.descriptor = M
    result = run_check(subject, next(c for c in CHECKS if c.name == "overrides"))
    assert not result.ok and f"but not layer {n - 1}'s self_attn.k_proj" in result.detail
