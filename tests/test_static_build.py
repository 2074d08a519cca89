"""The static build (generator/static_build.py) on small parsed sources: what the interpretation
of an `__init__` computes, what it leaves unknown, and where it stops. Nothing here imports the
sources: each is written to a temp dir and parsed."""

import textwrap

import pytest
from torch import nn
from transformers import PretrainedConfig

from generator.errors import StaticGap
from generator.parsed_source import ParsedCode, StaticSourceIndex
from generator.static_build import StaticBuilder
from generator.static_standins import InterpretedRaise, StandIn

HEADER = """
import math
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel

Path(__file__).with_name("imported").touch()  # never: the file is only parsed
"""


def build(tmp_path, body: str, cls: str, **config):
    path = tmp_path / "modeling_t.py"
    path.write_text(HEADER + textwrap.dedent(body))
    index = StaticSourceIndex()
    builder = StaticBuilder(ParsedCode([path], tmp_path, index), index)
    stand_in = builder.type_for(builder.code.class_named("modeling_t", cls))
    with builder.lenient():
        model = stand_in(PretrainedConfig(**config))
    assert not (tmp_path / "imported").exists()
    return model


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


BLOCKS = """
def width(config):
    multiple = config.multiple_of
    return multiple * math.ceil(int(2 * config.hidden / 3) / multiple)


class Norm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps


class Scaled(nn.Embedding):
    def __init__(self, num, dim, scale):
        super().__init__(num, dim)
        self.register_buffer("scale", torch.tensor(scale), persistent=False)


class Block(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.kind = config.kinds[index]
        self.heads = getattr(config, "heads", config.hidden // 8)
        if self.kind == "wide":
            self.ff = nn.Linear(config.hidden, width(config), bias=False)
        else:
            self.ff = nn.Linear(config.hidden, config.hidden, bias=False)
        self._make_norm(config)

    def _make_norm(self, config):
        self.norm = Norm(config.hidden)


class Model(PreTrainedModel):
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = Scaled(config.vocab, config.hidden, scale=config.hidden**0.5)
        self.blocks = nn.ModuleList()
        for i in range(config.layers):
            self.blocks.append(Block(config, i))
        self.post_init()
"""


def test_init_is_interpreted_into_modules_attributes_and_shapes(tmp_path):
    config = dict(hidden=48, vocab=10, layers=3, multiple_of=16, kinds=["wide", "narrow", "wide"])
    model = build(tmp_path, BLOCKS, "Model", **config)
    assert isinstance(model, StandIn) and type(model).__name__ == "Model"
    assert type(model).__module__.startswith("transformers_modules.")
    assert model.config.hidden == 48
    assert shapes(model) == {
        "embed.weight": (10, 48),  # nn.Embedding's own __init__, reached through super()
        "blocks.0.ff.weight": (32, 48),  # width(): 16 * ceil(int(2 * 48 / 3) / 16)
        "blocks.0.norm.weight": (48,),  # built by a method __init__ calls
        "blocks.1.ff.weight": (48, 48),
        "blocks.1.norm.weight": (48,),
        "blocks.2.ff.weight": (32, 48),
        "blocks.2.norm.weight": (48,),
    }
    assert [b.kind for b in model.blocks] == ["wide", "narrow", "wide"]  # plain attributes kept
    assert model.blocks[0].heads == 6  # getattr's default: the config has no `heads`
    assert isinstance(model.embed, nn.Embedding)  # a stand-in that is the torch module it extends
    assert "scale" in model.embed._non_persistent_buffers_set


def test_a_value_the_parse_cannot_compute_stays_unknown(tmp_path):
    body = """
    import numpy as np


    class Model(PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.width = int(np.ceil(config.hidden / 64) * 64)
            self.proj = nn.Linear(config.hidden, self.width)
            self.norm = nn.LayerNorm(config.hidden)
    """
    model = build(tmp_path, body, "Model", hidden=48)
    assert "width" not in vars(model) and "width" in model.static_unknowns()
    assert "its arguments are not all known" in model.proj.static_unknowns()[""]
    assert shapes(model) == {"norm.weight": (48,), "norm.bias": (48,)}  # no tensors invented


def test_an_undecided_branch_that_builds_modules_is_a_gap(tmp_path):
    body = """
    class Model(PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            if config.use_bias_norm:
                self.norm = nn.LayerNorm(config.hidden)
    """
    with pytest.raises(StaticGap, match=r"the condition `config.use_bias_norm` is not decided"):
        build(tmp_path, body, "Model", hidden=48)


def test_an_undecided_branch_of_local_values_only_is_not(tmp_path):
    body = """
    class Model(PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            scale = 1.0
            if config.some_flag:
                scale = 2.0
            self.scale = scale
            self.norm = nn.LayerNorm(config.hidden)
    """
    model = build(tmp_path, body, "Model", hidden=48)
    assert "scale" in model.static_unknowns() and shapes(model) == {
        "norm.weight": (48,), "norm.bias": (48,)
    }  # fmt: skip


def test_a_raise_the_interpretation_reaches_rejects_the_config(tmp_path):
    body = """
    class Model(PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            if config.hidden % 7:
                raise ValueError("hidden must be a multiple of 7")
    """
    with pytest.raises(InterpretedRaise, match="modeling_t.py"):
        build(tmp_path, body, "Model", hidden=48)
    build(tmp_path, body, "Model", hidden=49)


def test_module_level_dispatch_tables_resolve_when_their_key_is_known(tmp_path):
    body = """
    class A(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.q = nn.Linear(config.hidden, 8)


    class B(A):
        pass


    CLASSES = {"a": A, "eager": A, "sdpa": B}
    try:
        import flash_attn  # noqa: F401

        IMPL = "a"
    except ImportError:
        IMPL = "eager"


    class Model(PreTrainedModel):
        _supports_sdpa = True

        def __init__(self, config):
            super().__init__(config)
            self.attn = CLASSES[config.attn](config)
            self.by_impl = CLASSES[config._attn_implementation](config)
            self.by_install = CLASSES[IMPL](config)
    """
    model = build(tmp_path, body, "Model", hidden=16, attn="a")
    assert type(model.attn).__name__ == "A"
    # what PreTrainedModel.__init__ settles when no implementation is asked for: sdpa, as the
    # class supports it
    assert model.config._attn_implementation == "sdpa" and type(model.by_impl).__name__ == "B"
    # a name bound by a try/except at import time depends on what is installed: not read
    assert "by_install" in model.static_unknowns()
    assert set(shapes(model)) == {
        "attn.q.weight",
        "attn.q.bias",
        "by_impl.q.weight",
        "by_impl.q.bias",
    }


CONFIG_SOURCE = """
from transformers import PretrainedConfig


class TConfig(PretrainedConfig):
    model_type = "t"
    attribute_map = {"num_experts": "num_local_experts"}
    _labels = ("a", "b")
    hidden: int = 64
    heads: int = 4
    num_experts: int = 128
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden // self.heads
        super().__post_init__(**kwargs)

    @property
    def kinds(self):
        return ["dense" if i % 2 else "moe" for i in range(self.layers)]
"""


def test_the_config_is_config_json_read_through_the_parsed_class(tmp_path):
    import json

    from generator.checkpoint import Checkpoint
    from generator.static_config import checkpoint_config, config_class

    (tmp_path / "configuration_t.py").write_text(CONFIG_SOURCE)
    data = {"model_type": "t", "hidden": 48, "num_local_experts": 4, "layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(data))
    index = StaticSourceIndex()
    builder = StaticBuilder(ParsedCode([tmp_path / "configuration_t.py"], tmp_path, index), index)
    node = builder.code.class_named("configuration_t", "TConfig")
    cls = config_class(builder.code, builder, node)
    config = checkpoint_config(Checkpoint(tmp_path), builder.code, builder, node, cls)
    assert type(config).__name__ == "TConfig" and type(config).__mro__[1] is PretrainedConfig
    assert cls._labels == ("a", "b")  # a plain class attribute the model may read
    assert config.num_experts == 4  # config.json's, under its attribute_map name, not the default
    assert config.heads == 4  # a declared default
    assert config.head_dim == 12  # derived by the interpreted __post_init__
    assert config.kinds == ["moe", "dense", "moe"]  # an interpreted property
