"""load_model: sharded checkpoints, partial shards, tied weights, devices, bad input."""

import json
import shutil

import pytest
import torch
from runtime_llama_descriptor import HandLlamaDescriptor
from runtime_llama_descriptor import tiny_llama_config as tiny_config
from safetensors import safe_open as real_safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import puzzletron_runtime.loading as loading
from puzzletron_runtime import CheckpointError, DummyBlock, deci_x_patcher, load_model

DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]


def make_model(config, seed=0):
    torch.manual_seed(seed)
    with deci_x_patcher(HandLlamaDescriptor):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save(model, directory, shard_kb=40):
    model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    return sorted(directory.glob("*.safetensors"))


IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def logits(model, device="cpu", **kw):
    with torch.no_grad():
        return model(input_ids=IDS.to(device), **kw).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    model = make_model(tiny_config())
    shards = save(model, directory)
    return directory, model, shards


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tied")
    model = make_model(tiny_config(tie_word_embeddings=True), seed=1)
    save(model, directory)
    return directory, model


class CountingOpen:
    """Wraps safetensors.safe_open and records every tensor read."""

    def __init__(self):
        self.read: list[str] = []
        self.opened: list[str] = []

    def __call__(self, path, framework, device="cpu"):
        self.opened.append(path)
        counter = self

        class Handle:
            def __enter__(self):
                self.inner = real_safe_open(path, framework=framework, device=device)
                self.f = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                return self.f.get_slice(name)

            def get_tensor(self, name):
                counter.read.append(name)
                return self.f.get_tensor(name)

        return Handle()


@pytest.fixture
def counting(monkeypatch):
    counter = CountingOpen()
    monkeypatch.setattr(loading, "safe_open", counter)
    return counter


# -- whole models -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype", DEVICES)
def test_sharded_checkpoint_loads_with_equal_logits(checkpoint, device, dtype):
    directory, source, shards = checkpoint
    assert len(shards) >= 2
    loaded = load_model(HandLlamaDescriptor, directory, device=device, dtype=dtype)
    assert all(p.device.type == device and p.dtype == dtype for p in loaded.parameters())
    if dtype == torch.float32 and device == "cpu":
        reference = source
    else:  # what transformers itself loads at this dtype
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    assert loaded.model.rotary_emb.inv_freq.dtype == reference.model.rotary_emb.inv_freq.dtype
    assert torch.equal(logits(loaded, device), logits(reference, device))


def test_registered_name_is_accepted(checkpoint, monkeypatch):
    from puzzletron_runtime import ModelDescriptorFactory

    monkeypatch.setattr(ModelDescriptorFactory, "_registry", {"test_llama": HandLlamaDescriptor})
    directory, source, _ = checkpoint
    assert torch.equal(logits(load_model("test_llama", directory)), logits(source))


def test_tied_embeddings_load_and_are_re_tied(tied_checkpoint):
    directory, source = tied_checkpoint
    loaded = load_model(HandLlamaDescriptor, directory)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(source))


def test_heterogeneous_checkpoint_round_trip(tmp_path):
    config = tiny_config()
    config.block_configs = [
        {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 32}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 96}},
        {"attention": {"num_key_value_heads": 2}, "ffn": {"no_op": True}},
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    ]
    source = make_model(config, seed=2)
    save(source, tmp_path, shard_kb=20)
    saved = json.loads((tmp_path / "config.json").read_text())["block_configs"]
    assert saved[3] == {"attention": {"no_op": True}, "ffn": {"no_op": True}}
    loaded = load_model(HandLlamaDescriptor, tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.out_features == 32
    assert list(loaded.model.layers[3].parameters()) == []
    assert torch.equal(logits(loaded), logits(source))


def test_single_file_checkpoint(tmp_path):
    source = make_model(tiny_config())
    source.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert torch.equal(logits(load_model(HandLlamaDescriptor, tmp_path)), logits(source))


# -- partial shards -----------------------------------------------------------------------------
def names_under(model, *prefixes):
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def test_shard_reads_only_its_blocks_and_the_embedding(checkpoint, counting):
    directory, source, _ = checkpoint
    part = load_model(HandLlamaDescriptor, directory, owned_blocks={0, 1})
    expected = names_under(source, "model.embed_tokens.", "model.layers.0.", "model.layers.1.")
    assert sorted(counting.read) == sorted(expected)  # each read once, nothing else
    assert isinstance(part.model.layers[2], DummyBlock) and isinstance(
        part.model.layers[3], DummyBlock
    )
    assert len(set(counting.opened)) == len(counting.opened)  # each shard opened at most once
    # the shard computes the first half of the network exactly
    with torch.no_grad():
        full = source(input_ids=IDS, output_hidden_states=True).hidden_states[2]
        half = part(input_ids=IDS).logits  # dummy layers, norm and head pass hidden states on
    assert torch.equal(half, full)


@pytest.mark.parametrize("tied", [False, True])
def test_last_shard_reads_its_block_norm_and_head(checkpoint, tied_checkpoint, counting, tied):
    directory, source = tied_checkpoint if tied else checkpoint[:2]
    part = load_model(HandLlamaDescriptor, directory, owned_blocks={3})
    head = {"model.embed_tokens.weight"} if tied else {"lm_head.weight"}
    assert sorted(counting.read) == sorted(
        names_under(source, "model.layers.3.", "model.norm.") | head
    )
    with torch.no_grad():
        full = source(input_ids=IDS, output_hidden_states=True)
        with pytest.raises(RuntimeError, match="does not own the input embedding"):
            part(input_ids=IDS)
        tail = part(inputs_embeds=full.hidden_states[3]).logits
    assert torch.equal(tail, full.logits)


def test_owned_blocks_are_validated(checkpoint):
    with pytest.raises(ValueError, match=r"\[4\]"):
        load_model(HandLlamaDescriptor, checkpoint[0], owned_blocks={0, 4})
    with pytest.raises(ValueError, match="'some'"):
        load_model(HandLlamaDescriptor, checkpoint[0], owned_blocks="some")


# -- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def copy_of(checkpoint, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(checkpoint[0], directory)
    return directory


def test_missing_config_json(copy_of):
    (copy_of / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(HandLlamaDescriptor, copy_of)


def test_no_safetensors(copy_of):
    for f in copy_of.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        load_model(HandLlamaDescriptor, copy_of)


def test_index_naming_a_missing_shard(copy_of):
    shard = sorted(copy_of.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which does not exist"):
        load_model(HandLlamaDescriptor, copy_of)


def test_tensor_with_wrong_shape(copy_of):
    index = json.loads((copy_of / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.up_proj.weight"
    path = copy_of / index["weight_map"][name]
    tensors = load_file(path)
    tensors[name] = torch.zeros(7, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{path.name}: tensor {name} has shape \(7, 64\)"):
        load_model(HandLlamaDescriptor, copy_of)


def test_tensor_missing_from_the_checkpoint(copy_of):
    index_path = copy_of / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.weight"):
        load_model(HandLlamaDescriptor, copy_of)


def test_missing_rotary_rebuild_names_the_buffers(checkpoint):
    class NoRotary(HandLlamaDescriptor):
        @staticmethod
        def init_rotary_embedding(model, runtime):
            pass

    with pytest.raises(CheckpointError, match="model.rotary_emb.inv_freq"):
        load_model(NoRotary, checkpoint[0])
