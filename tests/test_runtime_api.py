"""puzzletron_runtime: block configs, no-op modules, the factory, descriptor defaults, patcher."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from runtime_llama_descriptor import HandLlamaDescriptor, tiny_llama_config
from torch import nn
from transformers import AutoModelForCausalLM

from puzzletron_runtime import (
    AttentionConfig,
    BlockConfig,
    DummyBlock,
    FFNConfig,
    MatchingZeros,
    ModelDescriptor,
    ModelDescriptorFactory,
    MoEConfig,
    Same,
    deci_x_patcher,
    maybe_cast_block_configs,
    return_tuple_of_size,
)
from puzzletron_runtime.puzzformer import return_list_of_size


def block(kv=2, width=128, attn_no_op=False, ffn_no_op=False):
    return {
        "attention": {"no_op": attn_no_op, "num_key_value_heads": None if attn_no_op else kv},
        "ffn": {"no_op": ffn_no_op, "intermediate_size": None if ffn_no_op else width},
    }


# -- block configs ---------------------------------------------------------------------------------
def test_block_config_round_trips_through_dict_and_json():
    b = BlockConfig.from_dict(
        {
            "attention": {"no_op": False, "num_key_value_heads": 4},
            "ffn": {
                "no_op": False,
                "moe": {
                    "num_local_experts": 8,
                    "num_experts_per_tok": 2,
                    "expert_intermediate_dim": 64,
                    "shared_expert_intermediate_dim": 32,
                },
            },
        }
    )
    assert isinstance(b.ffn.moe, MoEConfig)
    assert BlockConfig.from_dict(b.to_dict()) == b
    assert BlockConfig.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    assert BlockConfig(**b.to_dict()) == b


def test_no_op_subblock_drops_its_sizes():
    b = BlockConfig.from_dict(block(attn_no_op=True, ffn_no_op=True))
    assert b.attention.num_key_value_heads is None and b.ffn.intermediate_size is None
    assert (
        BlockConfig(
            attention=AttentionConfig(no_op=True, num_key_value_heads=3), ffn=FFNConfig(no_op=True)
        ).attention.num_key_value_heads
        is None
    )


@pytest.mark.parametrize(
    "data,field",
    [
        (
            {"attention": {"num_key_value_heads": 2}, "ffn": {"no_op": False}},
            "ffn.intermediate_size",
        ),
        (
            {"attention": {"no_op": False}, "ffn": {"intermediate_size": 8}},
            "attention.num_key_value_heads",
        ),
        (
            {"attention": {"num_key_value_heads": 0}, "ffn": {"intermediate_size": 8}},
            "attention.num_key_value_heads",
        ),
        (
            {"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": -1}},
            "ffn.intermediate_size",
        ),
        (
            {"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": True}},
            "ffn.intermediate_size",
        ),
        (
            {"attention": {"num_key_value_heads": 2, "heads": 3}, "ffn": {"intermediate_size": 8}},
            "heads",
        ),
        (
            {
                "attention": {"num_key_value_heads": 2},
                "ffn": {
                    "moe": {
                        "num_local_experts": 2,
                        "num_experts_per_tok": 3,
                        "expert_intermediate_dim": 8,
                    }
                },
            },
            "num_experts_per_tok",
        ),
        (
            {"attention": {"num_key_value_heads": 2}, "ffn": {"moe": {"num_local_experts": 2}}},
            "num_experts_per_tok",
        ),
        ({"attention": {"num_key_value_heads": 2}}, "ffn"),
        ({"attention": {"no_op": "yes"}, "ffn": {"intermediate_size": 8}}, "attention.no_op"),
    ],
)
def test_invalid_block_configs_name_the_field(data, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        BlockConfig.from_dict(data)


def test_maybe_cast_block_configs():
    assert maybe_cast_block_configs(None) is None
    b = BlockConfig.from_dict(block())
    assert maybe_cast_block_configs([block(), b]) == [b, b]
    with pytest.raises(ValueError, match=r"block_configs\[1\]: ffn.intermediate_size"):
        maybe_cast_block_configs([block(), {"attention": {"no_op": True}, "ffn": {}}])


# -- no-op modules ------------------------------------------------------------------------------------
def test_same_and_matching_zeros():
    x = torch.randn(3, 5, 4)
    mask = torch.ones(3, 5)
    assert Same()(x) is x
    assert Same()(hidden_states=x, attention_mask=mask) is x
    z = MatchingZeros()(x=x)
    assert torch.equal(z, torch.zeros_like(x)) and z.dtype == x.dtype
    assert Same().weight.numel() == 0
    for module in (Same(), MatchingZeros()):
        assert list(module.parameters()) == [] and list(module.buffers()) == []
    with pytest.raises(TypeError, match="hidden states"):
        MatchingZeros()(attention_mask=mask)


def test_projected_zeros_have_the_width_of_the_projection_they_replace():
    """Gemma 4's per-layer input gate projects the hidden states to a narrower width: zeros like
    its input would be too wide for the product with the per-layer input that reads them."""
    from puzzletron_runtime.puzzformer import ProjectedZeros

    gate = nn.Linear(8, 3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    z = ProjectedZeros(gate.out_features)(x)
    assert z.shape == gate(x.float()).shape == (2, 5, 3)
    assert z.dtype == torch.float64 and not z.any()
    assert ProjectedZeros(3)(hidden_states=x).shape == (2, 5, 3)
    assert list(ProjectedZeros(3).parameters()) == [] and list(ProjectedZeros(3).buffers()) == []


def test_return_tuple_of_size():
    cls = return_tuple_of_size(MatchingZeros, 3)
    assert return_tuple_of_size(MatchingZeros, 3) is cls  # cached
    assert return_tuple_of_size(MatchingZeros, 2) is not cls
    x = torch.randn(2, 4)
    out = cls()(x, attention_mask=None)
    assert isinstance(out, tuple) and len(out) == 3
    assert torch.equal(out[0], torch.zeros_like(x)) and out[1] is None and out[2] is None
    assert issubclass(cls, MatchingZeros) and "3" in repr(cls())


def test_return_list_of_size_can_be_extended_like_the_list_it_replaces():
    # OpenAI-GPT's block does `[h] + attn_outputs[1:]`: a tuple there raises TypeError
    cls = return_list_of_size(MatchingZeros, 2)
    assert return_list_of_size(MatchingZeros, 2) is cls  # cached
    assert cls is not return_tuple_of_size(MatchingZeros, 2)
    x = torch.randn(2, 4)
    out = cls()(x)
    assert isinstance(out, list) and len(out) == 2
    assert torch.equal(out[0], torch.zeros_like(x)) and out[1] is None
    assert len([x] + out[1:]) == 2
    assert issubclass(cls, MatchingZeros) and "list of 2" in repr(cls())


# -- factory ------------------------------------------------------------------------------------------
@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(ModelDescriptorFactory, "_registry", {})


def test_factory_register_get_and_resolve(clean_registry, tmp_path):
    ModelDescriptorFactory.register(test_llama=HandLlamaDescriptor)
    ModelDescriptorFactory.register(test_llama=HandLlamaDescriptor)  # same class: no-op
    assert ModelDescriptorFactory.get("test_llama") is HandLlamaDescriptor
    assert ModelDescriptorFactory.get(HandLlamaDescriptor) is HandLlamaDescriptor

    @ModelDescriptorFactory.register_decorator("llama")
    class Other(HandLlamaDescriptor):
        pass

    assert ModelDescriptorFactory.resolve(tiny_llama_config()) is Other
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert ModelDescriptorFactory.resolve(tmp_path) is Other
    with pytest.raises(KeyError, match="HandLlamaDescriptor.*Other|Other.*HandLlamaDescriptor"):
        ModelDescriptorFactory.register(llama=HandLlamaDescriptor)
    with pytest.raises(KeyError, match="known: llama, test_llama"):
        ModelDescriptorFactory.get("mistral")
    with pytest.raises(KeyError, match="'gpt2'.*known: llama, test_llama"):
        ModelDescriptorFactory.resolve(type("C", (), {"model_type": "gpt2"})())
    with pytest.raises(TypeError):
        ModelDescriptorFactory.register(bad=int)


# -- descriptor defaults ------------------------------------------------------------------------------
def test_no_op_support_follows_overrides():
    class NoNoOps(HandLlamaDescriptor):
        attn_no_op_post_init = ModelDescriptor.attn_no_op_post_init

    assert HandLlamaDescriptor.attn_no_op_supported() and HandLlamaDescriptor.mlp_no_op_supported()
    assert not NoNoOps.attn_no_op_supported() and NoNoOps.mlp_no_op_supported()
    assert ModelDescriptor.get_language_model_config("cfg") == "cfg"
    assert ModelDescriptor.requires_trust_remote_code() is False
    assert ModelDescriptor.uses_autocast() is True


def test_default_dummy_block_passes_input_through():
    dummy = HandLlamaDescriptor.create_dummy_block(nn.Linear(2, 2), 3)
    x = torch.randn(1, 2, 2)
    assert dummy(x, attention_mask=None) is x
    assert list(dummy.parameters()) == []
    tup = DummyBlock(1, returns_tuple=True, attributes={"attention_type": "sliding_attention"})
    assert tup(hidden_states=x) == (x,) and tup.attention_type == "sliding_attention"
    # a loop that unpacks `hidden_states, topk_indices = layer(...)` gets the Nones it unpacks
    hidden, rest = DummyBlock(1, returns_tuple=True, tuple_size=2)(x)
    assert hidden is x and rest is None
    with pytest.raises(ValueError, match="tuple_size"):
        DummyBlock(1, tuple_size=2)  # a tensor-returning dummy has no tuple to pad


def test_a_stage_without_the_embedding_answers_a_special_token_lookup_with_nans():
    """Gemma 4 unified, given inputs_embeds, embeds its image / audio token ids (0-d tensors)
    to find placeholders by equality: NaNs match no position; token ids still raise."""
    from puzzletron_runtime.utils.dummy_modules import DummyInputEmbedding

    stand_in = DummyInputEmbedding(4, torch.bfloat16)
    looked_up = stand_in(torch.tensor(7))
    assert looked_up.shape == (4,) and looked_up.dtype == torch.bfloat16
    embeds = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    assert not (embeds == looked_up).all(-1).any()
    with pytest.raises(RuntimeError, match="does not own the input embedding"):
        stand_in(torch.tensor([[1, 2, 3]]))
    with pytest.raises(RuntimeError, match="does not own the input embedding"):
        DummyInputEmbedding()(torch.tensor(7))  # no width known: no lookup either


def test_get_weight_groups_partitions_a_tiny_llama():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama_config())
    keys = list(model.state_dict())
    groups = HandLlamaDescriptor.get_weight_groups(keys, 4)
    assert sorted(k for v in groups.values() for k in v) == sorted(keys)
    assert list(groups)[:4] == ["embeddings", "lm_head", "block_0_attention", "block_0_ffn"]
    assert groups["lm_head"] == ["model.norm.weight", "lm_head.weight"]
    assert "model.layers.3.mlp.up_proj.weight" in groups["block_3_ffn"]


def test_get_weight_groups_first_match_and_unmatched_error():
    class Overlapping(HandLlamaDescriptor):
        @staticmethod
        def layer_name_predicates(num_layers):
            return {"a": re.compile(r"^x\."), "b": re.compile(r"^x\.y")}

    assert Overlapping.get_weight_groups(["x.y", "x.z"], 1) == {"a": ["x.y", "x.z"]}
    with pytest.raises(ValueError, match="'model.other.weight'"):
        HandLlamaDescriptor.get_weight_groups(["lm_head.weight", "model.other.weight", "zzz"], 1)


def test_get_weight_groups_builds_predicates_once(monkeypatch):
    calls = []
    real = HandLlamaDescriptor.layer_name_predicates

    class Counting(HandLlamaDescriptor):
        @staticmethod
        def layer_name_predicates(num_layers):
            calls.append(num_layers)
            return real(num_layers)

    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(40)]
    Counting.get_weight_groups(names, 40)
    assert calls == [40]


# -- patcher ------------------------------------------------------------------------------------------
def build(config, blocks=None, descriptor=HandLlamaDescriptor, device="meta"):
    with torch.device(device), deci_x_patcher(descriptor, blocks):
        return AutoModelForCausalLM.from_config(config)


def test_heterogeneous_shapes_change_exactly_the_requested_layers():
    config = tiny_llama_config()
    blocks = [block() for _ in range(4)]
    blocks[1] = block(width=32)
    blocks[2] = block(kv=1)
    base = {k: v.shape for k, v in build(config).state_dict().items()}
    het = {k: v.shape for k, v in build(config, blocks).state_dict().items()}
    changed = {k: het[k] for k in het if het[k] != base[k]}
    assert changed == {
        "model.layers.1.mlp.gate_proj.weight": (32, 64),
        "model.layers.1.mlp.up_proj.weight": (32, 64),
        "model.layers.1.mlp.down_proj.weight": (64, 32),
        "model.layers.2.self_attn.k_proj.weight": (16, 64),
        "model.layers.2.self_attn.v_proj.weight": (16, 64),
    }


def test_block_configs_default_to_the_config_attribute():
    config = tiny_llama_config()
    config.block_configs = [block(width=16 * (i + 1)) for i in range(4)]
    model = build(config)
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [16, 32, 48, 64]
    assert model.config.intermediate_size == 128  # the model's own config is untouched


def test_both_no_op_layer_returns_its_input_exactly():
    torch.manual_seed(0)
    config = tiny_llama_config()
    blocks = [block() for _ in range(4)]
    blocks[2] = block(attn_no_op=True, ffn_no_op=True)
    model = build(config, blocks, device="cpu").eval()
    layer = model.model.layers[2]
    assert list(layer.parameters()) == []
    seen = {}
    layer.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0]), with_kwargs=True)
    layer.register_forward_hook(lambda m, a, o: seen.update(y=o))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (3, 7)))
    assert torch.equal(seen["x"], seen["y"])


def test_unsupported_no_op_names_the_descriptor():
    class NoAttnNoOp(HandLlamaDescriptor):
        attn_no_op_post_init = ModelDescriptor.attn_no_op_post_init

    blocks = [block() for _ in range(4)]
    blocks[0] = block(attn_no_op=True)
    with pytest.raises(NotImplementedError, match="NoAttnNoOp"):
        build(tiny_llama_config(), blocks, descriptor=NoAttnNoOp)


def test_init_is_restored_on_exit():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = LlamaDecoderLayer.__init__
    build(tiny_llama_config(), [block() for _ in range(4)])
    assert LlamaDecoderLayer.__init__ is original


class ToyLayer(nn.Module):
    def __init__(self, config, layer_id=None):
        super().__init__()
        self.width = config.width
        self.layer_id = layer_id


class ToyDescriptor(HandLlamaDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [ToyLayer]

    @staticmethod
    def block_config_to_layer_overrides(block_config):
        return {"width": block_config.ffn.intermediate_size}


def test_layer_index_comes_from_bound_arguments():
    from types import SimpleNamespace

    config = SimpleNamespace(width=1)
    blocks = [block(width=10), block(width=20), block(width=30)]
    with deci_x_patcher(ToyDescriptor, blocks):
        positional = ToyLayer(config, 2)
        keyword = ToyLayer(config=config, layer_id=1)
        first = ToyLayer(config, layer_id=0)
        with pytest.raises(TypeError, match="ToyLayer.*layer index"):
            ToyLayer(config)
    assert (first.width, positional.width, keyword.width) == (10, 30, 20)
    assert config.width == 1
    assert "__init__" in ToyLayer.__dict__ and ToyLayer(config).width == 1


class DefaultIndexLayer(ToyLayer):
    def __init__(self, config, layer_id=0):  # a default index would hide a missing argument
        super().__init__(config, layer_id)


class DefaultIndexDescriptor(ToyDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [DefaultIndexLayer]


def test_a_layer_built_without_its_index_is_refused_even_with_a_default():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="DefaultIndexLayer.*no layer index"):
        with deci_x_patcher(DefaultIndexDescriptor, [block(width=10), block(width=20)]):
            DefaultIndexLayer(SimpleNamespace(width=1))


def test_a_layer_beyond_the_block_configs_is_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="layer 3 is built, but there are 3 block configs"):
        with deci_x_patcher(ToyDescriptor, [block(width=w) for w in (1, 2, 3)]):
            ToyLayer(SimpleNamespace(width=1), 3)


def test_block_configs_no_layer_used_are_refused():
    from types import SimpleNamespace

    config = SimpleNamespace(width=1)
    with pytest.raises(ValueError, match="3 block configs were given but 2 layer.*no layer 2"):
        with deci_x_patcher(ToyDescriptor, [block(width=w) for w in (1, 2, 3)]):
            ToyLayer(config, 0)
            ToyLayer(config, 1)


def test_block_config_count_is_checked_on_a_real_model():
    blocks = [block() for _ in range(5)]  # the tiny llama has 4 layers
    with pytest.raises(ValueError, match="5 block configs were given but 4 layer"):
        build(tiny_llama_config(), blocks)
    with pytest.raises(ValueError, match="layer 3 is built, but there are 3 block configs"):
        build(tiny_llama_config(), blocks[:3])


class ExplodingLayer(ToyLayer):
    def __init__(self, config, layer_id=None):
        raise RuntimeError("boom")


class ExplodingDescriptor(ToyDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [ExplodingLayer, ToyLayer]


def test_init_is_restored_when_construction_raises():
    from types import SimpleNamespace

    exploding, toy = ExplodingLayer.__dict__["__init__"], ToyLayer.__dict__["__init__"]
    with pytest.raises(RuntimeError, match="boom"):
        with deci_x_patcher(ExplodingDescriptor, [block(width=5)]):
            assert ExplodingLayer.__dict__["__init__"] is not exploding
            ExplodingLayer(SimpleNamespace(width=1), 0)
    assert ExplodingLayer.__dict__["__init__"] is exploding
    assert ToyLayer.__dict__["__init__"] is toy


def test_scratch_registrations_are_dropped():
    from puzzletron_runtime import ModelDescriptorFactory

    before = ModelDescriptorFactory.names()

    class Elsewhere(HandLlamaDescriptor):
        pass

    with ModelDescriptorFactory.scratch():
        ModelDescriptorFactory.register(scratch_only_name=Elsewhere)
        assert ModelDescriptorFactory.get("scratch_only_name") is Elsewhere
    assert ModelDescriptorFactory.names() == before


# -- layers without an index parameter (OpenAI-GPT's Block) are numbered by construction order --
class IndexlessLayer(nn.Module):
    def __init__(self, config, scale=False):  # no index parameter at all
        super().__init__()
        self.width = config.width


class IndexlessDescriptor(ToyDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [IndexlessLayer]


class IndexlessStack(nn.Module):
    def __init__(self, config, n):
        super().__init__()
        self.layers = nn.ModuleList([IndexlessLayer(config, scale=True) for _ in range(n)])


def test_a_layer_class_without_an_index_parameter_is_numbered_by_construction_order():
    from types import SimpleNamespace

    blocks = [block(width=w) for w in (10, 20, 30)]
    with deci_x_patcher(IndexlessDescriptor, blocks) as built:
        stack = IndexlessStack(SimpleNamespace(width=1), 3)
    assert [layer.width for layer in stack.layers] == [10, 20, 30]
    built.check_positions(stack, lambda i: f"layers.{i}")  # each sits where it was numbered


def test_an_indexless_layer_built_in_another_order_than_its_stack_is_refused():
    from types import SimpleNamespace

    with deci_x_patcher(IndexlessDescriptor, [block(width=w) for w in (10, 20)]) as built:
        stack = IndexlessStack(SimpleNamespace(width=1), 2)
    stack.layers = nn.ModuleList(list(stack.layers)[::-1])  # a stack held in reverse order
    with pytest.raises(ValueError, match="built as layer 0 is not the model's layers.0"):
        built.check_positions(stack, lambda i: f"layers.{i}")


def test_an_extra_indexless_layer_is_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="layer 2 is built, but there are 2 block configs"):
        with deci_x_patcher(IndexlessDescriptor, [block(width=w) for w in (10, 20)]):
            IndexlessStack(SimpleNamespace(width=1), 3)


def test_an_index_parameter_left_out_is_still_refused_next_to_indexless_numbering():
    """Numbering by order is only for classes that cannot receive an index: a class with an
    index parameter that was not passed one is refused, as before."""
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="ToyLayer.*no layer index"):
        with deci_x_patcher(ToyDescriptor, [block(width=10), block(width=20)]):
            ToyLayer(SimpleNamespace(width=1))


class KwargsLayer(nn.Module):
    def __init__(self, config, **kwargs):
        super().__init__()
        self.width = config.width


class KwargsDescriptor(ToyDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [KwargsLayer]


def test_an_index_passed_through_kwargs_is_read_and_kwargs_without_one_are_refused():
    from types import SimpleNamespace

    config = SimpleNamespace(width=1)
    with deci_x_patcher(KwargsDescriptor, [block(width=10), block(width=20)]):
        second = KwargsLayer(config, layer_idx=1)
        first = KwargsLayer(config, layer_idx=0)
        with pytest.raises(TypeError, match="KwargsLayer.*no layer index"):
            KwargsLayer(config)  # **kwargs could carry an index: never numbered by order
    assert (first.width, second.width) == (10, 20)


def test_a_layer_index_built_twice_is_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="layer 1 is built twice"):
        with deci_x_patcher(ToyDescriptor, [block(width=10), block(width=20)]):
            ToyLayer(SimpleNamespace(width=1), 1)
            ToyLayer(SimpleNamespace(width=1), 1)


def test_openai_gpt_blocks_take_their_block_configs_in_order():
    """OpenAI-GPT builds `Block(n_positions, config, scale=True)` with no index: each block
    gets the block config of its position in transformer.h."""
    from transformers import OpenAIGPTConfig
    from transformers.models.openai.modeling_openai import Block

    class GPTDescriptor(ToyDescriptor):
        @staticmethod
        def decoder_layer_cls():
            return Block

        @staticmethod
        def block_config_to_layer_overrides(block_config):
            return {"n_head": block_config.attention.num_key_value_heads}

    config = OpenAIGPTConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    heads = [1, 2, 4]
    blocks = [block(kv=h) for h in heads]
    with torch.device("meta"), deci_x_patcher(GPTDescriptor, blocks) as built:
        model = AutoModelForCausalLM.from_config(config)
    assert [layer.attn.n_head for layer in model.transformer.h] == heads
    built.check_positions(model, lambda i: f"transformer.h.{i}")


def test_a_no_op_stand_in_keeps_the_shape_of_what_it_replaced_without_weights():
    """RWKV's `_rescale_layers` divides `block.attention.output.weight` of every block in
    place: the stand-in of a removed attention must still have an `o_proj.weight` to read
    (an empty tensor, outside the state dict), its plain attributes and its children's names."""
    config = tiny_llama_config()
    blocks = [block() for _ in range(4)]
    blocks[1] = block(attn_no_op=True)
    model = build(config, blocks, device="cpu").eval()
    stand_in = model.model.layers[1].self_attn
    assert isinstance(stand_in, MatchingZeros) and list(stand_in.parameters()) == []
    assert not any(k.startswith("model.layers.1.self_attn.") for k in model.state_dict())
    assert stand_in.layer_idx == 1  # a plain attribute of the replaced attention
    weight = stand_in.o_proj.weight
    assert weight.numel() == 0 and weight.dtype == torch.float32
    weight.div_(2)  # what in-place rescaling does: nothing, without error
    assert not hasattr(stand_in.o_proj, "bias")  # Llama's o_proj has none
    with pytest.raises(RuntimeError, match="cannot run"):
        stand_in.o_proj(torch.zeros(1, 64))


class _Inner(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _Wrapper(nn.Module):
    """Zamba's hybrid layer: built from a decoder layer built before it."""

    def __init__(self, inner, linear):
        super().__init__()
        self.inner, self.linear = inner, linear


class _WrappingDescriptor(HandLlamaDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [_Inner, _Wrapper]


def test_a_layer_built_from_another_decoder_layer_is_refused_naming_both():
    config = SimpleNamespace(hidden_size=4)
    with pytest.raises(ValueError, match="_Wrapper is built from _Inner layer 0 .*'inner'"):
        with deci_x_patcher(_WrappingDescriptor, [block(), block()]):
            _Wrapper(_Inner(config, layer_idx=0), nn.Linear(4, 4))


class SubConfigLayer(nn.Module):
    """DBRX-like: the layer reads its width from a sub-config of its config."""

    def __init__(self, config, layer_id=None):
        super().__init__()
        self.width = config.ffn_config.width
        self.layer_id = layer_id


class SubConfigDescriptor(ToyDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return [SubConfigLayer]

    @staticmethod
    def block_config_to_layer_overrides(block_config):
        return {"ffn_config.width": block_config.ffn.intermediate_size}


def test_a_dotted_override_sets_the_layer_s_own_copy_of_a_sub_config():
    """Without the rule the patcher sets an attribute named "ffn_config.width" on the config
    and every layer keeps the sub-config's width."""
    from types import SimpleNamespace

    config = SimpleNamespace(ffn_config=SimpleNamespace(width=1))
    with deci_x_patcher(SubConfigDescriptor, [block(width=10), block(width=20)]):
        layers = [SubConfigLayer(config, 0), SubConfigLayer(config, 1)]
    assert [layer.width for layer in layers] == [10, 20]
    assert config.ffn_config.width == 1  # the caller's sub-config is untouched
