"""A module the model runs both before layer 0 and after the last layer (NanoChat norms the
embeddings with its final norm) runs, on a partial stage, only on the side of the stack that
stage owns: a first stage applies it before its layers, a last stage after them, and the stages
chained give the whole model's output."""

import copy

import pytest
import torch
from runtime_llama_descriptor import HandLlamaDescriptor
from torch import nn

from puzzletron_runtime.loading import _replace_unowned


class NormBothSides(nn.Module):
    """embed -> norm -> layers -> norm -> head, as NanoChatModel.forward runs."""

    def __init__(self, weighted: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.norm = nn.LayerNorm(8, elementwise_affine=weighted)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class ToyNames(HandLlamaDescriptor):
    @staticmethod
    def input_embedding_name():
        return "embed"

    @staticmethod
    def output_embedding_name():
        return "head"

    @staticmethod
    def final_norm_name():
        return "norm"

    @staticmethod
    def layer_block_name(index):
        return f"layers.{index}"


IDS = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))


def stage(model, owned):
    part = copy.deepcopy(model)
    _replace_unowned(ToyNames, part, set(owned), 3)
    return part


class PerLayerInputs(nn.Module):
    """Gemma 4's shape: every layer reads, besides the hidden states, an input the model
    computes from the token ids before layer 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.per_layer = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        per_layer = self.per_layer(input_ids)
        for layer in self.layers:
            x = layer(x) * per_layer
        return self.head(self.norm(x))


class ToyPerLayerInputs(ToyNames):
    @staticmethod
    def stages_need_token_ids():
        return True


def test_a_later_stage_of_layers_reading_token_ids_keeps_the_embedding():
    """Without the rule the stage gets a stand-in embedding that refuses token ids, and the
    per-layer inputs of its layers cannot be computed."""
    model = PerLayerInputs()
    with torch.no_grad():
        want = model(IDS)
        hidden = model.layers[0](model.embed(IDS)) * model.per_layer(IDS)
        part = copy.deepcopy(model)
        _replace_unowned(ToyPerLayerInputs, part, {1, 2}, 3)
        assert isinstance(part.embed, nn.Embedding)
        part.layers[1].register_forward_pre_hook(lambda _m, _a: (hidden,))
        assert torch.equal(part(IDS), want)
        plain = copy.deepcopy(model)
        _replace_unowned(ToyNames, plain, {1, 2}, 3)
        with pytest.raises(RuntimeError, match="does not own the input embedding"):
            plain(IDS)


@pytest.mark.parametrize("split", [1, 2])
def test_a_weightless_norm_run_on_both_sides_chains_to_the_whole_output(split):
    whole = NormBothSides(weighted=False).eval()
    first, second = stage(whole, range(split)), stage(whole, range(split, 3))
    with torch.no_grad():
        hidden = first(IDS)  # the first stage's head and the norm after the stack pass through
        x = whole.norm(whole.embed(IDS))
        for layer in whole.layers[:split]:
            x = layer(x)
        assert torch.equal(hidden, x)
        assert torch.equal(second(inputs_embeds=hidden), whole(IDS))
    # repeated calls keep the phases apart
    with torch.no_grad():
        assert torch.equal(second(inputs_embeds=first(IDS)), whole(IDS))


def test_a_middle_stage_runs_the_norm_on_neither_side():
    whole = NormBothSides(weighted=False).eval()
    middle = stage(whole, [1])
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(middle(inputs_embeds=x), whole.layers[1](x))


def test_a_weighted_norm_needed_before_layer_0_is_refused_on_a_first_stage():
    """Its weights are read with the last block only; skipping it would silently give
    another model."""
    whole = NormBothSides(weighted=True).eval()
    with pytest.raises(RuntimeError, match="final norm norm before layer 0"):
        stage(whole, [0, 1])(IDS)
    with torch.no_grad():  # the stage that owns the last block, fed hidden states, is fine
        stage(whole, [2])(inputs_embeds=torch.randn(2, 5, 8))


def test_nanochat_pipeline_stages_give_the_whole_models_logits(tmp_path):
    from transformers import AutoModelForCausalLM, NanoChatConfig

    import generated
    from generator.tiny import tiny_config
    from puzzletron_runtime import load_stage

    descriptor = generated.get_descriptor("nanochat")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(NanoChatConfig)).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for stages in (2, 3):
            x = ids
            for k in range(stages):
                x = load_stage(descriptor, tmp_path, k, stages)(x)
            assert torch.equal(x, want), f"{stages} stages"


# -- what the model reads from layers another stage owns ----------------------------------------
class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.empty(8), persistent=False)  # computed, not loaded
        self.cache = None

    def setup_cache(self, batch):
        self.cache = torch.zeros(batch, 8)

    def forward(self, x):
        return self.proj(x) * self.scale


class MixerLayer(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.mixer = Mixer()

    def forward(self, x):
        return x + self.mixer(x)


class ReadsIntoLayers(nn.Module):
    """Like RecurrentGemma (`hasattr(layer.temporal_block, "_setup_cache")` before its loop) and
    Falcon-H1 (`_init_weights` fills `layer.mamba.mup_vector` of every layer): code outside the
    layer loop reads into each layer, including those another stage owns."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([MixerLayer(k) for k in ("a", "b", "a")])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16)
        self.init_buffers()

    def init_buffers(self):
        for layer in self.layers:
            layer.mixer.scale = torch.full((8,), 0.5)

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            if hasattr(layer.mixer, "setup_cache"):
                layer.mixer.setup_cache(x.shape[0])
            assert layer.kind in ("a", "b")
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_a_stage_gives_its_dummies_what_the_model_reads_from_its_layers():
    whole = ReadsIntoLayers().eval()
    first, second = stage(whole, [0]), stage(whole, [1, 2])
    dummy = first.layers[1]
    assert dummy.kind == "b"  # plain attributes of the layer it stands for
    assert not hasattr(dummy.mixer, "setup_cache")  # a hollow child: nothing to set up
    assert list(dummy.parameters()) == []  # no weights: nothing to read from the checkpoint
    assert not any(k.startswith("layers.1.") for k in first.state_dict())
    assert dummy.mixer.scale.shape == (8,)  # non-persistent buffers stay for code that fills them
    first.init_buffers()
    second.init_buffers()
    with torch.no_grad():
        assert torch.equal(second(inputs_embeds=first(IDS)), whole(IDS))
