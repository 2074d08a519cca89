"""load_model reads checkpoints that transformers' save_pretrained writes under legacy names.

transformers 5 saves a Mixtral's fused experts as per-expert `block_sparse_moe.experts.N.w1`
tensors and converts them back on load; load_model must too (through transformers' own
conversion machinery), for whole models, for shards (reading only their blocks' tensors), in
another dtype, and for a heterogeneous stack whose layers hold different numbers of experts.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import puzzletron_runtime.loading as loading
from generator import cli
from generator.verify import build, load_descriptor
from puzzletron_runtime import load_model


def tiny_mixtral(**kw):
    return MixtralConfig(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        **kw,
    )


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen"
    assert cli.main(["generate", "mixtral", "--out", str(out)]) == 0
    base = load_descriptor("mixtral", out)

    class WithExperts(base):
        """The generated descriptor plus the expert-count override (issue 8)."""

        @staticmethod
        def block_config_to_layer_overrides(block_config):
            overrides = base.block_config_to_layer_overrides(block_config)
            moe = block_config.ffn.moe
            overrides["num_local_experts"] = moe.num_local_experts if moe else None
            return overrides

    return WithExperts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_mixtral()).eval()
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path, max_shard_size="100KB")
    return model, path


IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_checkpoint_really_uses_legacy_names(checkpoint):
    _, path = checkpoint
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_whole_model_loads_with_equal_logits(mixtral, checkpoint):
    model, path = checkpoint
    loaded = load_model(mixtral, path)
    assert torch.equal(logits(loaded), logits(model))


def test_a_shard_reads_only_its_blocks(mixtral, checkpoint, monkeypatch):
    _, path = checkpoint
    read = []
    real = loading.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(loading, "safe_open", Counting)
    shard = load_model(mixtral, path, owned_blocks={0, 1})
    assert read and all(".layers.2." not in k and ".layers.3." not in k for k in read)
    assert any(".layers.1.block_sparse_moe.experts.3.w2" in k for k in read)
    assert all(p.device.type == "cpu" for p in shard.parameters())


def test_other_dtype(mixtral, checkpoint):
    _, path = checkpoint
    loaded = load_model(mixtral, path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_heterogeneous_expert_counts_round_trip(mixtral, tmp_path):
    config = tiny_mixtral()
    dense = {"num_key_value_heads": 2}
    blocks = [
        {
            "attention": dense,
            "ffn": {
                "moe": {
                    "num_local_experts": n,
                    "num_experts_per_tok": 2,
                    "expert_intermediate_dim": 32,
                }
            },
        }
        for n in (4, 2, 3, 4)
    ]
    config.block_configs = blocks
    source = build(mixtral, config, seed=4)
    assert source.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 2
    source.save_pretrained(tmp_path, max_shard_size="100KB")
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight" not in names
    loaded = load_model(mixtral, tmp_path)
    assert loaded.model.layers[2].mlp.experts.gate_up_proj.shape[0] == 3
    assert torch.equal(logits(loaded), logits(source))
