"""A hand-written Llama descriptor for the runtime tests (independent of the generator)."""

import re

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from puzzletron_runtime import MatchingZeros, ModelDescriptor, Same, return_tuple_of_size


class HandLlamaDescriptor(ModelDescriptor):
    @staticmethod
    def decoder_layer_cls():
        return LlamaDecoderLayer

    @staticmethod
    def block_config_to_layer_overrides(block_config):
        return {
            "intermediate_size": block_config.ffn.intermediate_size,
            "num_key_value_heads": block_config.attention.num_key_value_heads,
        }

    @staticmethod
    def attn_no_op_post_init(decoder_layer):
        decoder_layer.input_layernorm = Same()
        decoder_layer.self_attn = return_tuple_of_size(MatchingZeros, 2)()

    @staticmethod
    def mlp_no_op_post_init(decoder_layer):
        decoder_layer.post_attention_layernorm = Same()
        decoder_layer.mlp = MatchingZeros()

    @staticmethod
    def init_rotary_embedding(model, runtime):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config).to(runtime.device)

    @staticmethod
    def input_embedding_name():
        return "model.embed_tokens"

    @staticmethod
    def output_embedding_name():
        return "lm_head"

    @staticmethod
    def final_norm_name():
        return "model.norm"

    @staticmethod
    def layer_block_name(index):
        return f"model.layers.{index}"

    @staticmethod
    def layer_name_predicates(num_layers):
        groups = {
            "embeddings": re.compile(r"^model\.embed_tokens\.weight$"),
            "lm_head": re.compile(r"^(model\.norm\.weight|lm_head\.weight)$"),
        }
        for i in range(num_layers):
            groups[f"block_{i}_attention"] = re.compile(
                rf"^model\.layers\.{i}\.(input_layernorm|self_attn\.[qkvo]_proj)\.weight$"
            )
            groups[f"block_{i}_ffn"] = re.compile(
                rf"^model\.layers\.{i}\.(post_attention_layernorm|mlp\.(gate|up|down)_proj)\.weight$"
            )
        return groups


def tiny_llama_config(**overrides):
    """A 4-layer Llama small enough to build and run in milliseconds."""
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**base, **overrides})
