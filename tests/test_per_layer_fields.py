"""A size the layers of one kind read from different config fields (generator/per_layer_fields.py):
Inkling's sliding layers read swa_num_key_value_heads, its full layers num_key_value_heads, in one
attention class. Synthetic: a two-field attention and a probe that builds it."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from generator import kinds
from generator.errors import PuzzleGenError
from generator.modelopt.converter import _per_layer_field
from generator.overrides import KV_HEAD_FIELDS, _fewer_heads, _Run
from generator.spec import ConfigOverride, KindTest
from generator.tiny import _prefixed_kv_heads

KV = "attention.num_key_value_heads"


class Config(SimpleNamespace):
    def get_text_config(self):
        return self


def make_config(**changes):
    values = dict(
        hidden_size=8,
        head_dim=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        layer_types=["sliding", "sliding", "full"],
    )
    values.update(changes)
    return Config(**values)


class SlidingOrFullAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        sliding = config.layer_types[layer_idx] == "sliding"
        heads = config.swa_num_attention_heads if sliding else config.num_attention_heads
        kv = config.swa_num_key_value_heads if sliding else config.num_key_value_heads
        self.q = nn.Linear(config.hidden_size, heads * config.head_dim)
        self.k = nn.Linear(config.hidden_size, kv * config.head_dim)
        self.v = nn.Linear(config.hidden_size, kv * config.head_dim)


class Layer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = SlidingOrFullAttention(config, layer_idx)


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(Layer(config, i) for i in range(len(config.layer_types)))


class Probe:
    """What overrides._Run asks of the probe, over the synthetic model on the meta device."""

    def __init__(self, config):
        self.config = config

    def tiny_config(self):
        return copy.deepcopy(self.config)

    def _build(self, changes):
        config = self.tiny_config()
        for k, v in changes.items():
            setattr(config, k, v)
        with torch.device("meta"):
            return Model(config)

    def shape_diffs(self, changes, paths):
        base, changed = self._build({}), self._build(changes)
        out = {}
        for p in paths:
            a = {k: tuple(v.shape) for k, v in base.get_submodule(p).named_parameters()}
            b = {k: tuple(v.shape) for k, v in changed.get_submodule(p).named_parameters()}
            out[p] = {k: b.get(k, ()) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        return out

    def shape_diff(self, changes, path):
        return self.shape_diffs(changes, [path])[path]

    def layer_change_fails(self, changes, path):
        return None


def run_kv(config):
    """Infer the KV-heads override of the synthetic kind, analysed on its first layer."""
    facts = []
    ctx = SimpleNamespace(probe=Probe(config), fact=lambda *a: facts.append(a))
    model = ctx.probe._build({})
    n = len(config.layer_types)
    group = kinds.KindGroup(Layer, (), list(range(n)), list(model.layers))
    reads = {f: "synthetic.py:1" for f in vars(config) if f != "layer_types"}
    sb = SimpleNamespace(members=("self_attn",), cores=("self_attn",), judges=())
    run = _Run(ctx, "attention", sb, reads, "layers.0", group, "layers")
    run.plain(KV, KV_HEAD_FIELDS, _fewer_heads)
    return {o.config_field: o for o in run.found}, facts


def test_each_field_a_layer_of_the_kind_reads_is_overridden_with_the_layers_that_read_it():
    """The kind is analysed on a sliding layer, which num_key_value_heads does not resize: the
    field is still found (it resizes the full layer), and so is the field the sliding layers
    read, by the tensors it resizes (k and v, as num_key_value_heads does in the full layer),
    not by its name; swa_num_attention_heads (q) is not taken."""
    found, _ = run_kv(make_config())
    assert set(found) == {"num_key_value_heads", "swa_num_key_value_heads"}
    assert {o.block_config_attr for o in found.values()} == {KV}
    assert found["num_key_value_heads"].layers == (KindTest("layer_type", None, value="full"),)
    assert found["swa_num_key_value_heads"].layers == (
        KindTest("layer_type", None, value="sliding"),
    )


def test_a_kind_whose_layers_read_one_field_gets_no_layer_tests():
    found, _ = run_kv(make_config(layer_types=["full", "full", "full"]))
    assert set(found) == {"num_key_value_heads"}
    assert found["num_key_value_heads"].layers == ()


def test_layers_no_field_resizes_are_named():
    """Sliding layers with a fixed KV width: the full layers' field is kept, and the layers
    left without a field are a fact (the oracle's whole-kind check then fails on them)."""

    class FixedSliding(SlidingOrFullAttention):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            if config.layer_types[layer_idx] == "sliding":
                self.k = nn.Linear(config.hidden_size, 2)
                self.v = nn.Linear(config.hidden_size, 2)

    original = Layer.__init__

    def init(self, config, layer_idx):
        original(self, config, layer_idx)
        self.self_attn = FixedSliding(config, layer_idx)

    Layer.__init__ = init
    try:
        found, facts = run_kv(make_config())
    finally:
        Layer.__init__ = original
    assert set(found) == {"num_key_value_heads"} and found["num_key_value_heads"].layers == ()
    assert any("of layers 0, 1" in name and value == "none" for name, value, _ in facts)


def test_tiny_configs_keep_a_prefixed_kv_head_count_grouped():
    """16 of 64 heads scaled like any head count is 1 of 4: multi-query, which no smaller block
    config resizes. Kept grouped against the head count of its own prefix, as num_key_value_heads
    is; one KV head stays one, as many as heads stays as many."""
    present = {"swa_num_attention_heads": 64, "swa_num_key_value_heads": 16}
    assert _prefixed_kv_heads(present, {"swa_num_attention_heads": 4}) == {
        "swa_num_key_value_heads": 2
    }
    present = {"swa_num_attention_heads": 64, "swa_num_key_value_heads": 1}
    assert _prefixed_kv_heads(present, {"swa_num_attention_heads": 4}) == {
        "swa_num_key_value_heads": 1
    }
    present = {"swa_num_attention_heads": 64, "swa_num_key_value_heads": 64}
    assert _prefixed_kv_heads(present, {"swa_num_attention_heads": 4}) == {
        "swa_num_key_value_heads": 4
    }
    # no head count of its own (Dia's cross_num_key_value_heads): left to the other rules
    assert _prefixed_kv_heads({"cross_num_key_value_heads": 16}, {}) == {}


def _spec():
    return SimpleNamespace(model_type="toy", kinds=[SimpleNamespace(selector=(), children=())])


def _overrides():
    return (
        ConfigOverride("num_key_value_heads", KV, "m.py:1", (), None, None,
                       (KindTest("layer_type", None, value="full"),)),
        ConfigOverride("swa_num_key_value_heads", KV, "m.py:1", (), None, None,
                       (KindTest("layer_type", None, value="sliding"),)),
    )  # fmt: skip


def test_the_converter_reads_each_layers_size_from_the_field_that_layer_reads():
    kind = SimpleNamespace(label="Layer")
    f = _per_layer_field(
        _spec(), kind, KV, _overrides(), ("attention", "num_key_value_heads"), True
    )
    text_config = SimpleNamespace(num_key_value_heads=3, swa_num_key_value_heads=5)
    for layer_type, want in (("full", 3), ("sliding", 5)):
        decoder_layer = SimpleNamespace(layer_type=layer_type)
        assert eval(f.expr, {"text_config": text_config, "decoder_layer": decoder_layer}) == want
    assert "swa_num_key_value_heads" in f.note and "'sliding'" in f.note


def test_the_converter_refuses_what_it_cannot_tell_per_layer():
    kind = SimpleNamespace(label="Layer")
    path = ("attention", "num_key_value_heads")
    with pytest.raises(PuzzleGenError, match="stack of one kind does not build the layers"):
        _per_layer_field(_spec(), kind, KV, _overrides(), path, False)
    untold = tuple(ConfigOverride(o.config_field, KV, "m.py:1") for o in _overrides())
    with pytest.raises(PuzzleGenError, match="could not be told by an attribute"):
        _per_layer_field(_spec(), kind, KV, untold, path, True)
