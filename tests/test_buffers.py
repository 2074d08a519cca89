"""Buffers a meta-device build leaves empty, rebuilt by the runtime's one general mechanism.

Each case builds a tiny model normally (the reference), builds the same config on the meta
device, gives it the reference's state dict and lets `rebuild_buffers` fill the rest; every
buffer must then equal the reference's (torch.equal, same dtype), and no weight may change.
The families cover buffers beside parameters (Gemma's embed_scale inside the embedding), inside
attention modules (GPT-J's sinusoidal table, OpenAI-GPT's and GPT-Neo-style causal masks), in the
model itself (GPT-BigCode's mask, CTRL's positional encoding) and rotary tables.
"""

from pathlib import Path

import pytest
import torch

import generated
from generator.probe import build_model
from generator.source import resolve
from generator.tiny import tiny_config
from generator.verify import build, save_sharded
from puzzletron_runtime import CheckpointError, load_model
from puzzletron_runtime.buffers import empty_buffers, rebuild_buffers

FAMILIES = ["llama", "gemma", "gemma3_text", "gptj", "gpt_bigcode", "openai-gpt", "ctrl", "xglm"]


def reference_and_meta(model_type):
    source = resolve(model_type)
    config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    reference = build_model(source.causal_lm_cls, config, "cpu")
    meta = build_model(source.causal_lm_cls, config, "meta")
    meta.load_state_dict(reference.state_dict(), strict=False, assign=True)
    return reference, meta


def buffer_mismatches(a, b) -> list[str]:
    mine, theirs = dict(a.named_buffers()), dict(b.named_buffers())
    bad = sorted(set(mine) ^ set(theirs))
    for name in set(mine) & set(theirs):
        x, y = mine[name], theirs[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            bad.append(name)
        elif not torch.equal(x, y):
            bad.append(name)
    return sorted(bad)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rebuilt_buffers_equal_a_normal_build(model_type):
    reference, meta = reference_and_meta(model_type)
    empty = empty_buffers(meta)
    assert empty, "the meta build leaves no buffer empty: the case tests nothing"
    rebuilt = rebuild_buffers(meta, "cpu")
    assert rebuilt == empty
    assert empty_buffers(meta) == {}
    assert buffer_mismatches(reference, meta) == []
    # weights are never re-initialised, even where _init_weights would touch them
    params = dict(reference.named_parameters(remove_duplicate=False))
    for name, p in meta.named_parameters(remove_duplicate=False):
        assert torch.equal(p, params[name]), name


def test_buffer_left_empty_is_caught(monkeypatch):
    """A rebuild that forgets one buffer (here Gemma's embed_scale, beside the embedding's
    weight) leaves a visible sentinel, and the comparison with a normal build fails."""
    reference, meta = reference_and_meta("gemma")
    cls = type(meta.model)  # the pretrained model nearest the embedding initialises it
    original = cls._init_weights

    def forgetful(self, module):
        if type(module).__name__.endswith("ScaledWordEmbedding"):
            return
        original(self, module)

    monkeypatch.setattr(cls, "_init_weights", forgetful)
    rebuild_buffers(meta, "cpu")
    assert buffer_mismatches(reference, meta) == ["model.embed_tokens.embed_scale"]
    assert torch.isnan(meta.model.embed_tokens.embed_scale).all()


def test_rebuild_touches_only_empty_buffers():
    reference, meta = reference_and_meta("gptj")
    rebuild_buffers(meta, "cpu")
    table = meta.transformer.h[0].attn.embed_positions
    assert rebuild_buffers(meta, "cpu") == {}
    assert meta.transformer.h[0].attn.embed_positions is table


def test_no_rebuild_leaves_buffers_on_meta_and_load_model_says_which(tmp_path):
    d = generated.get_descriptor("llama")

    class NoRebuild(d):
        @staticmethod
        def init_rotary_embedding(model, runtime):
            pass

    config = tiny_config(resolve("llama").config_cls)
    save_sharded(build(d, config), tmp_path)
    with pytest.raises(CheckpointError, match="model.rotary_emb.inv_freq"):
        load_model(NoRebuild, tmp_path)


@pytest.mark.parametrize("model_type", generated.available())
def test_loaded_model_buffers_equal_a_normal_build(model_type, tmp_path: Path):
    """Every committed descriptor: the model load_model returns has every buffer equal to the
    same model built normally (through the same descriptor, so block configs match)."""
    d = generated.get_descriptor(model_type)
    config = tiny_config(resolve(model_type).config_cls)
    reference = build(d, config, seed=2)
    save_sharded(reference, tmp_path)
    loaded = load_model(d, tmp_path, dtype=torch.float32)
    assert buffer_mismatches(reference, loaded) == []


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["gemma", "gptj", "gpt_bigcode"])
def test_buffers_are_rebuilt_on_the_target_device(model_type):
    reference, meta = reference_and_meta(model_type)
    empty = empty_buffers(meta)
    rebuild_buffers(meta, "cuda")
    refs = dict(reference.named_buffers())
    for path, names in empty.items():
        module = meta.get_submodule(path) if path else meta
        name = f"{path}.{names[0]}" if path else names[0]
        buffer, ref = getattr(module, names[0]), refs[name]
        assert buffer.device.type == "cuda", name
        assert buffer.dtype == ref.dtype and torch.equal(buffer.cpu(), ref), name


def test_a_buffer_only_an_ancestor_initialises_is_rebuilt_from_there(monkeypatch):
    """Falcon-H1's Mamba mixers hold a non-persistent mup_vector that transformers fills in
    `_init_weights(FalconH1Model)`, not in the mixer's own: the rebuild walks up to it."""
    import puzzletron_runtime.buffers as buffers

    reference, meta = reference_and_meta("falcon_h1")
    rebuild_buffers(meta, "cpu")
    assert buffer_mismatches(reference, meta) == []
    _, again = reference_and_meta("falcon_h1")
    monkeypatch.setattr(buffers, "_from_ancestors", lambda *args: None)
    rebuild_buffers(again, "cpu")
    assert "model.layers.0.mamba.mup_vector" in buffer_mismatches(reference, again)
