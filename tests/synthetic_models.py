"""Small synthetic modeling code for the analysis tests.

Each decoder layer here is a shape a real transformers family takes (pre-norm Llama, four-norm
Gemma 2, post-norm OPT, parallel GPT-J / GPT-NeoX, Falcon's config branches, ...). The analysis
reads this file's source with libcst; the tests build instances only so the analysis can look up
children and config attributes, the way the probe does for real models.
"""

from types import SimpleNamespace

import torch
from torch import nn


def make_config(**overrides):
    cfg = dict(hidden_size=8, intermediate_size=16, num_key_value_heads=2, num_hidden_layers=2)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


class Norm(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * self.weight


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv = nn.Linear(config.hidden_size, 2 * config.num_key_value_heads)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        return self.o(self.q(hidden_states)), None


class PerLayerConfigAttention(nn.Module):
    """Gemma 4 unified: the KV heads come from transformers' per-layer view of the config."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        layer_config = config.per_layer_config[layer_idx]
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv = nn.Linear(config.hidden_size, 2 * layer_config.num_key_value_heads)


class TripleAttention(Attention):
    def forward(self, hidden_states, attention_mask=None):
        return self.o(hidden_states), None, None


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.down(self.up(x))


class PreNormLayer(nn.Module):
    """Llama: input_layernorm -> attention; post_attention_layernorm -> MLP."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.mlp = MLP(config)
        self.attention_type = "full_attention"

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class PostSubblockNormLayer(nn.Module):
    """OLMo 2: each subblock's output is normalised before its residual join; here the same
    child name as PreNormLayer's FFN input norm, post_attention_layernorm, is the attention's."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = Norm(config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class TripleArityLayer(PreNormLayer):
    """The attention call unpacks three values."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.self_attn = TripleAttention(config)

    def forward(self, hidden_states, attention_mask=None):
        residual = hidden_states
        attn_out, _weights, _cache = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask
        )
        hidden_states = residual + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,)


class IndexedOutputLayer(PreNormLayer):
    """`outputs = self.attn(...)` then `outputs[0]`: a tuple whose size the call site hides."""

    def forward(self, hidden_states, attention_mask=None):
        residual = hidden_states
        attn_outputs = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask
        )
        attn_output = attn_outputs[0]
        hidden_states = attn_output + residual
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class FourNormLayer(nn.Module):
    """Gemma 2: post_attention_layernorm normalises the attention *output* (attention segment)."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.pre_feedforward_layernorm = Norm(config.hidden_size)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = Norm(config.hidden_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class PostNormLayer(nn.Module):
    """OPT with do_layer_norm_before=False: norms run on the stream after each residual join."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.do_layer_norm_before = getattr(config, "do_layer_norm_before", False)
        self.self_attn_layer_norm = Norm(config.hidden_size)
        self.self_attn = Attention(config)
        self.final_layer_norm = Norm(config.hidden_size)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, attn_weights = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = nn.functional.dropout(hidden_states, p=0.1, training=self.training)
        hidden_states = residual + hidden_states
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        hidden_states_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc1(hidden_states)
        hidden_states = torch.relu(hidden_states)
        hidden_states = self.fc2(hidden_states)
        hidden_states = (residual + hidden_states).view(hidden_states_shape)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        return outputs


class ParallelLayer(nn.Module):
    """GPT-J: one shared norm feeds attention and MLP; a single residual join."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.ln_1 = Norm(config.hidden_size)
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, hidden_states, attention_mask=None):
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_outputs, _ = self.attn(hidden_states=hidden_states, attention_mask=attention_mask)
        feed_forward_hidden_states = self.mlp(hidden_states)
        hidden_states = attn_outputs + feed_forward_hidden_states + residual
        return hidden_states


class ParallelTwoNormLayer(nn.Module):
    """GPT-NeoX use_parallel_residual: decided by a config attribute; each branch its own norm."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = Norm(config.hidden_size)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, hidden_states, attention_mask=None):
        attn_output, _ = self.attention(
            self.input_layernorm(hidden_states), attention_mask=attention_mask
        )
        if self.use_parallel_residual:
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            hidden_states = mlp_output + attn_output + hidden_states
        else:
            attn_output = attn_output + hidden_states
            mlp_output = self.mlp(self.post_attention_layernorm(attn_output))
            hidden_states = mlp_output + attn_output
        return hidden_states


def dropout_add(x, residual, prob, training):
    return residual + nn.functional.dropout(x, p=prob, training=training)


class DropoutAddLayer(nn.Module):
    """Falcon: joins through a helper function and an in-place `+=`, config-dependent branches."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config = config
        self.self_attention = Attention(config)
        self.mlp = MLP(config)
        if config.parallel_attn:
            self.input_layernorm = Norm(config.hidden_size)
        else:
            self.input_layernorm = Norm(config.hidden_size)
            self.post_attention_layernorm = Norm(config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, layer_past=None):
        residual = hidden_states
        attention_layernorm_out = self.input_layernorm(hidden_states)
        attention_output, _ = self.self_attention(
            attention_layernorm_out, attention_mask=attention_mask
        )
        if self.config.parallel_attn:
            mlp_layernorm_out = attention_layernorm_out
        else:
            residual = dropout_add(attention_output, residual, 0.0, training=self.training)
            mlp_layernorm_out = self.post_attention_layernorm(residual)
        mlp_output = self.mlp(mlp_layernorm_out)
        if self.config.parallel_attn:
            mlp_output += attention_output
        output = dropout_add(mlp_output, residual, 0.0, training=self.training)
        return output


class HelperMethodLayer(PreNormLayer):
    """The FFN segment is computed in a helper method of the layer, which is inlined."""

    def _ff_block(self, x):
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, hidden_states, attention_mask=None):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self._ff_block(hidden_states)
        return hidden_states


class NoResidualLayer(PreNormLayer):
    def forward(self, hidden_states, attention_mask=None):
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        return self.mlp(hidden_states)


class ResidualAddingAttention(Attention):
    """Bloom's attention: adds the residual it is passed to its own output."""

    def forward(self, hidden_states, residual, attention_mask=None):
        output = self.o(self.q(hidden_states))
        output = dropout_add(output, residual, 0.0, self.training)
        return output, None


class ResidualAddingMLP(MLP):
    """MPT's MLP: `output + residual` inside the module."""

    def forward(self, hidden_states, residual):
        output = self.down(self.up(hidden_states))
        output = output + residual
        return output


class ResidualGatedMLP(MLP):
    """Receives the residual too, but multiplies by it: no join inside."""

    def forward(self, hidden_states, residual):
        return self.down(self.up(hidden_states)) * residual


class ResidualIntoSubblockLayer(nn.Module):
    """Bloom / MPT: the residual is passed into each subblock, which joins it itself."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attention = ResidualAddingAttention(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.mlp = ResidualAddingMLP(config)

    def forward(self, hidden_states, attention_mask=None):
        layernorm_output = self.input_layernorm(hidden_states)
        residual = hidden_states
        attention_output, _ = self.self_attention(
            layernorm_output, residual, attention_mask=attention_mask
        )
        layernorm_output = self.post_attention_layernorm(attention_output)
        residual = attention_output
        output = self.mlp(layernorm_output, residual=residual)
        return output, None


class ResidualGatedLayer(ResidualIntoSubblockLayer):
    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.mlp = ResidualGatedMLP(config)


class SelfResidualAttentionBlock(nn.Module):
    """CPM-Ant's attention block: norm, attention and the residual add inside one module."""

    def __init__(self, config):
        super().__init__()
        self.layernorm_before_attention = Norm(config.hidden_size)
        self.self_attention = Attention(config)

    def forward(self, hidden_states, attention_mask, position_bias=None):
        outputs = self.layernorm_before_attention(hidden_states)
        outputs, attn_weights = self.self_attention(outputs, attention_mask)
        hidden_states = hidden_states + outputs
        return hidden_states, attn_weights


class SelfResidualFFNBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layernorm_before_ffn = Norm(config.hidden_size)
        self.ffn = MLP(config)

    def forward(self, hidden_states):
        outputs = self.ffn(self.layernorm_before_ffn(hidden_states))
        return hidden_states + outputs


class BlocksOwnTheirResidualLayer(nn.Module):
    """The layer only chains two blocks; each adds its own input to its output."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.self_att = SelfResidualAttentionBlock(config)
        self.ffn = SelfResidualFFNBlock(config)

    def forward(self, hidden_states, attention_mask=None, position_bias=None):
        hidden_states, attn_weights = self.self_att(
            hidden_states, attention_mask=attention_mask, position_bias=position_bias
        )
        hidden_states = self.ffn(hidden_states)
        return hidden_states, attn_weights


class ToyModel(nn.Module):
    """A base model: embeddings before the loop, the loop reads `attention_type`, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, config.hidden_size)
        self.embed_positions = nn.Embedding(16, config.hidden_size)
        self.layers = nn.ModuleList(
            [PreNormLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Norm(config.hidden_size)
        self.masks = {"full_attention": None}

    def forward(self, input_ids, position_ids):
        hidden_states = self.embed_tokens(input_ids) + self.embed_positions(position_ids)
        for decoder_layer in self.layers[: len(self.layers)]:
            hidden_states = decoder_layer(
                hidden_states, attention_mask=self.masks[decoder_layer.attention_type]
            )
        hidden_states = self.norm(hidden_states)
        return hidden_states


class StackFromMethodModel(ToyModel):
    """Zamba2: `self.layers = self.get_layers()`, a method of its own that returns the stack."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.layers = self.get_layers()

    def get_layers(self):
        layers = []
        for i in range(self.config.num_hidden_layers):
            layers.append(PreNormLayer(self.config, i))
        return nn.ModuleList(layers)


class TupleLoopModel(nn.Module):
    """GPT-J style loop: `outputs = block(...)`, then `outputs[0]`; no final norm."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(16, config.hidden_size)
        self.h = nn.ModuleList([TripleArityLayer(config) for _ in range(config.num_hidden_layers)])
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids):
        hidden_states = self.wte(input_ids)
        for i, block in enumerate(self.h):
            outputs = block(hidden_states, attention_mask=None)
            hidden_states = outputs[0]
        return self.proj(torch.tanh(hidden_states))


class CarryingLayer(TripleArityLayer):
    """Returns its hidden states and a value for the next layer."""

    def forward(self, hidden_states, attention_mask=None):
        (hidden_states,) = super().forward(hidden_states, attention_mask)
        return hidden_states, attention_mask


class UnpackingLoopModel(nn.Module):
    """GLM-MoE-DSA style loop: each layer returns its hidden states and a value the next layer
    takes (`hidden_states, carried = layer(...)`); a starred target takes any rest."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            [CarryingLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = Norm(config.hidden_size)

    def forward(self, hidden_states):
        carried = None
        for layer in self.layers:
            hidden_states, carried, *_ = layer(hidden_states, attention_mask=carried)
        return self.norm(hidden_states)


class HeadBeforeNormModel(nn.Module):
    """HY-V4: `hidden_states = self.norm(self.hc_head(hidden_states))` after the loop: a weighted
    module collapses the layers' streams, then the final norm."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([PreNormLayer(config) for _ in range(config.num_hidden_layers)])
        self.hc_head = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = Norm(config.hidden_size)

    def forward(self, hidden_states):
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states)
        hidden_states = self.norm(self.hc_head(hidden_states))
        return hidden_states


class ZipLoopModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([PreNormLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_layernorm = Norm(config.hidden_size)

    def forward(self, hidden_states, masks):
        for idx, (layer, mask) in enumerate(zip(self.layers, masks)):
            hidden_states = layer(hidden_states=hidden_states, attention_mask=mask)
        return self.final_layernorm(hidden_states)


class OptionalProjectionModel(nn.Module):
    """OPT: projections that exist only when the embedding width differs from the hidden size."""

    def __init__(self, config):
        super().__init__()
        proj_dim = getattr(config, "word_embed_proj_dim", config.hidden_size)
        self.embed_tokens = nn.Embedding(16, proj_dim)
        if proj_dim != config.hidden_size:
            self.project_in = nn.Linear(proj_dim, config.hidden_size)
            self.project_out = nn.Linear(config.hidden_size, proj_dim)
        else:
            self.project_in = None
            self.project_out = None
        self.layers = nn.ModuleList([PreNormLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = Norm(config.hidden_size)

    def forward(self, input_ids):
        hidden_states = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


# -- layer kinds: stacks whose layers differ -------------------------------------------------------
class SSMMixer(nn.Module):
    """A Mamba-like token mixer: its own parameters beside its projections."""

    def __init__(self, config):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.A_log = nn.Parameter(torch.zeros(config.hidden_size))
        self.out_proj = nn.Linear(2 * config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, cache_params=None, attention_mask=None):
        return self.out_proj(self.in_proj(hidden_states) * self.A_log.exp().repeat(2))


class Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, 4)
        self.experts = nn.ModuleList([MLP(config) for _ in range(4)])

    def forward(self, x):
        return sum(e(x) for e in self.experts)


class CastResidualLayer(nn.Module):
    """Mamba: one residual segment, a mixer fed context; the residual is cast to float32 first
    (`residual.to(torch.float32)`), so the join adds a value computed from the stream without a
    module call."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.norm = Norm(config.hidden_size)
        self.mixer = SSMMixer(config)
        self.residual_in_fp32 = True

    def forward(self, hidden_states, cache_params=None, attention_mask=None):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(
            hidden_states, cache_params=cache_params, attention_mask=attention_mask
        )
        hidden_states = residual + hidden_states
        return hidden_states


class TypedBlock(nn.Module):
    """Nemotron-H: one class; `config.layer_types[layer_idx]` picks the mixer (an SSM mixer, an
    attention, an MLP or experts), the one residual segment is norm -> mixer, and the layer
    keeps its type as `block_type`."""

    MIXERS = {"mamba": SSMMixer, "attention": Attention, "mlp": MLP, "moe": Experts}

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.norm = Norm(config.hidden_size)
        self.mixer = self.MIXERS[self.block_type](config)

    def forward(self, hidden_states, attention_mask=None, cache_params=None):
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if self.block_type == "mamba":
            hidden_states = self.mixer(hidden_states, cache_params=cache_params)
        elif self.block_type == "attention":
            hidden_states, _ = self.mixer(hidden_states, attention_mask=attention_mask)
        else:
            hidden_states = self.mixer(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class TwoMixerLayer(nn.Module):
    """Falcon-H1: an attention and an SSM mixer read the same normed input (both fed context)
    and their sum joins the residual once: one attention subblock with two cores."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attn = Attention(config)
        self.mamba = SSMMixer(config)
        self.pre_ff_layernorm = Norm(config.hidden_size)
        self.feed_forward = MLP(config)

    def forward(self, hidden_states, attention_mask=None, cache_params=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attention_out, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        mamba_out = self.mamba(hidden_states, cache_params=cache_params)
        hidden_states = residual + attention_out + mamba_out
        residual = hidden_states
        hidden_states = self.pre_ff_layernorm(hidden_states)
        hidden_states = self.feed_forward(hidden_states)
        return residual + hidden_states


class RefiningConvolution(nn.Module):
    """Inkling's short convolution: a causal depthwise convolution (fed a cache and a mask) that
    adds its input to its output, in float32 and cast back."""

    def __init__(self, config):
        super().__init__()
        self.conv1d = nn.Conv1d(
            config.hidden_size, config.hidden_size, 3, groups=config.hidden_size
        )

    def forward(self, hidden_states, cache_params=None, conv_mask=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        residual = hidden_states
        hidden_states = self.conv1d(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = (hidden_states + residual).to(dtype=input_dtype)
        return hidden_states


class RefinedSegmentsLayer(nn.Module):
    """Inkling: each segment's core is followed by a refining convolution that reads the cache;
    the segment is what the core before the convolution is."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attn = Attention(config)
        self.attn_conv = RefiningConvolution(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.mlp = MLP(config)
        self.mlp_conv = RefiningConvolution(config)

    def forward(self, hidden_states, attention_mask=None, cache_params=None, conv_mask=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = self.attn_conv(
            hidden_states, cache_params=cache_params, conv_mask=conv_mask
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.mlp_conv(hidden_states, cache_params=cache_params, conv_mask=conv_mask)
        hidden_states = residual + hidden_states
        return hidden_states


class ContextFedConvolution(RefiningConvolution):
    """The same convolution without the added input: a token mixer of its own."""

    def forward(self, hidden_states, cache_params=None, conv_mask=None):
        return self.conv1d(hidden_states.transpose(1, 2)).transpose(1, 2)


class UnrefinedSegmentsLayer(RefinedSegmentsLayer):
    """Both convolutions mix tokens on their own: the MLP segment ends in a mixer fed context."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.attn_conv = ContextFedConvolution(config)
        self.mlp_conv = ContextFedConvolution(config)


class StateMixer(nn.Module):
    """RWKV's time mix: a recurrent state passed in, updated in place by a helper method and
    handed back beside the output."""

    def __init__(self, config):
        super().__init__()
        self.key = nn.Linear(config.hidden_size, config.hidden_size)

    def _shift(self, hidden, state=None):
        if state is not None:
            state[0][:, :] = hidden[:, -1]
        return self.key(hidden), state

    def forward(self, hidden, state=None, use_cache=False):
        key, state = self._shift(hidden, state=state)
        return key * 2, state


class FreshStateMixer(StateMixer):
    """Returns a new value computed from its state argument: not the argument itself."""

    def forward(self, hidden, state=None, use_cache=False):
        return self.key(hidden), state * 2


class SometimesStateMixer(StateMixer):
    """Hands its state back on one path only."""

    def forward(self, hidden, state=None, use_cache=False):
        if use_cache:
            return self.key(hidden), state
        return self.key(hidden), None


class UntupledStateMixer(StateMixer):
    """Returns a tuple with its state on one path and a bare tensor on the other."""

    def forward(self, hidden, state=None, use_cache=False):
        if use_cache:
            return self.key(hidden), state
        return self.key(hidden)


class StateChannelMix(MLP):
    """RWKV's channel mix: the state passed positionally and handed back."""

    def forward(self, hidden, state=None):
        return self.down(self.up(hidden)), state


class RecurrentStateLayer(nn.Module):
    """RWKV's block: the state threaded through both subblocks and returned after the hidden
    states, then a third value on either branch."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.ln1 = Norm(config.hidden_size)
        self.mixer = StateMixer(config)
        self.ln2 = Norm(config.hidden_size)
        self.channel = StateChannelMix(config)

    def forward(self, hidden, state=None, use_cache=False, output_attentions=False):
        mixed, state = self.mixer(self.ln1(hidden), state=state, use_cache=use_cache)
        hidden = hidden + mixed
        channel, state = self.channel(self.ln2(hidden), state)
        hidden = hidden + channel
        outputs = (hidden, state)
        if output_attentions:
            outputs += (mixed,)
        else:
            outputs += (None,)
        return outputs


class FreshStateLayer(RecurrentStateLayer):
    """Its time mix returns a new state: the layer hands back no argument."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.mixer = FreshStateMixer(config)


class PerLayerInputLayer(PreNormLayer):
    """Gemma 4: after the MLP, a second position-wise segment gates the stream by a per-layer
    input the layer is passed (`act(gate(h)) * per_layer_input`), projects it back to the
    hidden width, norms it and adds it to the residual."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.per_layer_input_gate = nn.Linear(config.hidden_size, 4, bias=False)
        self.act_fn = nn.GELU()
        self.per_layer_projection = nn.Linear(4, config.hidden_size, bias=False)
        self.post_per_layer_input_norm = Norm(config.hidden_size)

    def forward(self, hidden_states, per_layer_input=None, attention_mask=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.per_layer_input_gate(hidden_states)
        hidden_states = self.act_fn(hidden_states)
        hidden_states = hidden_states * per_layer_input
        hidden_states = self.per_layer_projection(hidden_states)
        hidden_states = self.post_per_layer_input_norm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class TwoPlainMLPLayer(PreNormLayer):
    """A second MLP segment that reads only the hidden states: not a per-layer-input segment,
    so two FFN segments stay refused."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.mlp_2 = MLP(config)

    def forward(self, hidden_states, attention_mask=None):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp_2(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class PerLayerInputModel(nn.Module):
    """Gemma 4's model: per-layer inputs computed in helper methods before the loop."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, config.hidden_size)
        self.embed_tokens_per_layer = nn.Embedding(16, 4 * config.num_hidden_layers)
        self.per_layer_model_projection = nn.Linear(
            config.hidden_size, 4 * config.num_hidden_layers
        )
        self.layers = nn.ModuleList(
            [PerLayerInputLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Norm(config.hidden_size)

    def get_per_layer_inputs(self, input_ids):
        return self.embed_tokens_per_layer(input_ids)

    def project_per_layer_inputs(self, inputs_embeds, per_layer_inputs):
        return self.per_layer_model_projection(inputs_embeds) + per_layer_inputs

    def forward(self, input_ids):
        hidden_states = self.embed_tokens(input_ids)
        per_layer_inputs = self.get_per_layer_inputs(input_ids)
        per_layer_inputs = self.project_per_layer_inputs(hidden_states, per_layer_inputs)
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(hidden_states, per_layer_inputs[..., i * 4 : i * 4 + 4])
        hidden_states = self.norm(hidden_states)
        return hidden_states


class NormAttentionNorm(nn.Module):
    """DBRX's norm_attn_norm: the attention's pre-norm, the attention, its residual join, then
    the FFN's pre-norm; it hands on both the residual stream and the FFN's normed input."""

    def __init__(self, config):
        super().__init__()
        self.norm_1 = Norm(config.hidden_size)
        self.attn = MixingAttention(config)
        self.norm_2 = Norm(config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        residual_states = hidden_states
        hidden_states = self.norm_1(hidden_states)
        hidden_states, _ = self.attn(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings
        )
        hidden_states = hidden_states + residual_states
        residual_states = hidden_states
        hidden_states = self.norm_2(hidden_states)
        return residual_states, hidden_states


class MixingAttention(Attention):
    """An attention that mixes positions (a causal mean under its mask), so the oracle sees a
    token mixer."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        mixed = attention_mask @ self.q(hidden_states) / attention_mask.sum(-1, keepdim=True)
        return self.o(mixed), None


class NestedSegmentLayer(nn.Module):
    """DBRX: a child holds the attention segment, its join and the FFN's norm; the layer runs
    the FFN on the child's second value and joins it to the first."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.norm_attn_norm = NormAttentionNorm(config)
        self.ffn = MLP(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        resid_states, hidden_states = self.norm_attn_norm(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings
        )
        hidden_states = self.ffn(hidden_states)
        hidden_states = resid_states + hidden_states
        return hidden_states


class NestedReference(nn.Module):
    """A model around NestedSegmentLayer, in the form the oracle reads (embedding, layer stack
    run in order, final norm, head; a causal mask the attention receives as context)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(16, config.hidden_size)
        self.layers = nn.ModuleList(
            [NestedSegmentLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = Norm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, 16, bias=False)

    def forward(self, input_ids, **kwargs):
        x = self.embed_tokens(input_ids)
        mask = torch.ones(x.shape[1], x.shape[1]).tril()
        for layer in self.layers:
            x = layer(x, attention_mask=mask)
        return SimpleNamespace(logits=self.lm_head(self.norm(x)))


class BiasReturningAttention(Attention):
    """GPT-NeoX-Japanese: the attention returns its output and its output bias, added later."""

    def __init__(self, config):
        super().__init__(config)
        self.out_bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        return self.o(self.q(hidden_states)), self.out_bias


class BiasAddedLaterLayer(PreNormLayer):
    """Both values of the attention's call reach the output, but only one carries the hidden
    states: the attention is a core, not a container to read through."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.self_attn = BiasReturningAttention(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attn_output, attn_bias = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = residual + (attn_output + attn_bias)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states
