"""Layer kinds: stacks whose layers differ, analysed kind by kind (generator/kinds.py), the
rules that came with them (a residual cast without a module call, a child whose group depends on
the layer's kind, expert sizes told apart by the tensors they resize, overrides proven on one
layer, kinds only other configs build), and the tiny configs that show every kind."""

import copy
import functools
import re

import pytest
import synthetic_models as sm
import torch
from torch import nn

from generator import kinds, layer_weights, predicates
from generator.analysis import layer_flow
from generator.analysis.layer_flow import ATTENTION, FFN, analyze_layer
from generator.analysis.source_index import SourceIndex
from generator.errors import InferenceError
from generator.infer import infer
from generator.probe import layer_children
from generator.spec import ClassRef, KindChildren, LayerKind, Subblock
from puzzletron_runtime.model_descriptor.kind_groups import group_by_layer_kind, split_roles
from puzzletron_runtime.model_descriptor.weight_groups import group_names, move_to_sole_subblock


@functools.lru_cache(maxsize=None)
def spec_of(model_type):
    return infer(model_type)


def flow_of(layer):
    return analyze_layer(type(layer), layer, layer_children(layer), SourceIndex())


def typed_stack(types):
    config = sm.make_config(layer_types=types, num_hidden_layers=len(types))
    return nn.ModuleList([sm.TypedBlock(config, i) for i in range(len(types))])


# -- data flow ------------------------------------------------------------------------------------
def test_a_residual_cast_without_a_module_call_still_joins():
    layer = sm.CastResidualLayer(sm.make_config())
    flow = flow_of(layer)
    assert flow.subblocks[ATTENTION].members == ["norm", "mixer"]
    assert FFN not in flow.subblocks  # one residual segment: a Mamba layer has no FFN


def test_without_the_cast_rule_the_join_is_not_found(monkeypatch):
    monkeypatch.setattr(layer_flow, "_call_free_chain", lambda graph, node: [node])
    with pytest.raises(InferenceError, match="cannot follow the hidden states"):
        flow_of(sm.CastResidualLayer(sm.make_config()))


def test_each_kind_of_a_typed_stack_has_the_subblock_its_mixer_makes():
    stack = typed_stack(["mamba", "moe", "attention", "mlp"])
    flows = [flow_of(layer) for layer in stack]
    assert [sorted(f.subblocks) for f in flows] == [[ATTENTION], [FFN], [ATTENTION], [FFN]]
    assert flows[2].arity["mixer"] == 2  # the attention returns (hidden, weights)


# -- kinds and their selectors --------------------------------------------------------------------
def test_kinds_group_layers_by_class_children_and_core_classes():
    stack = typed_stack(["mamba", "moe", "attention", "mlp", "mamba"])
    groups = kinds.group_layers(stack)
    assert [g.layers for g in groups] == [[0, 4], [1], [2], [3]]
    labels = [kinds.label(g, groups) for g in groups]
    assert labels[0] == "TypedBlock with mixer: SSMMixer"


def test_selectors_prefer_tests_a_no_op_leaves_true():
    """Same class and child names: the layer's plain `block_type` tells the kinds apart, not the
    mixer's class (which a no-op replaces before the other no-op asks)."""
    stack = typed_stack(["mamba", "moe", "attention", "mlp"])
    groups = kinds.group_layers(stack)
    selectors = kinds.selectors(groups)
    assert [[(t.child, t.value) for t in s] for s in selectors] == [
        [("block_type", "mamba")],
        [("block_type", "moe")],
        [("block_type", "attention")],
        [("block_type", "mlp")],
    ]
    for group, selector in zip(groups, selectors):
        for other in groups:
            holds = all(kinds.holds(t, other.modules[0], {}) for t in selector)
            assert holds == (other is group)


def test_selectors_fall_back_to_a_child_class_and_refuse_what_nothing_tells_apart():
    stack = typed_stack(["mamba", "attention"])
    for layer in stack:
        del layer.block_type  # no plain attribute left: the mixer's class decides
    selectors = kinds.selectors(kinds.group_layers(stack))
    assert [(t.child, t.cls.name) for (t,) in selectors] == [
        ("mixer", "SSMMixer"),
        ("mixer", "Attention"),
    ]

    class Layer(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

    odd = nn.ModuleList([Layer(nn.Linear(2, 2)), Layer(nn.Identity())])
    with pytest.raises(InferenceError, match="tell the layer kinds apart"):
        kinds.selectors(kinds.group_layers(odd))


# -- weight groups of a child whose subblock depends on the kind ----------------------------------
def test_a_child_shared_by_kinds_of_different_subblocks_is_grouped_by_what_is_below_it():
    spec = spec_of("nemotron_h")
    p = spec.predicates
    assert p.followers == (r"norm\..+",)  # the norm before every layer's only subblock
    assert r"mixer\.A_log" in p.attention and r"mixer\.experts\..+" in p.ffn
    assert not any(alt.startswith(r"mixer\..+") for alt in p.attention + p.ffn)
    groups = predicates.compile_groups(p, 4)
    # the predicates alone put an MLP layer's norm with the attention ...
    assert groups["block_3_attention"].match("model.layers.3.norm.weight")
    # ... and get_weight_groups moves it to the only subblock that layer has
    names = ["model.layers.3.norm.weight", "model.layers.3.mixer.up_proj.weight"]
    names += ["model.layers.0.norm.weight", "model.layers.0.mixer.A_log"]
    grouped = {}
    for name in names:
        (hit,) = [g for g, pattern in groups.items() if pattern.match(name)]
        grouped.setdefault(hit, []).append(name)
    moved = move_to_sole_subblock(grouped, 4, re.compile(r"^model\.layers\.\d+\.norm\..+$"))
    assert moved["block_3_ffn"] == [
        "model.layers.3.norm.weight",
        "model.layers.3.mixer.up_proj.weight",
    ]
    assert "block_3_attention" not in moved
    assert moved["block_0_attention"] == [
        "model.layers.0.norm.weight",
        "model.layers.0.mixer.A_log",
    ]


def test_the_layer_stack_named_otherwise_on_disk_joins_the_predicates():
    """Nemotron-H's save_pretrained writes `backbone.layers.N...` for `model.layers.N...`."""
    p = spec_of("nemotron_h").predicates
    assert p.disk_layer_prefixes == (r"backbone\.layers",)
    groups = predicates.compile_groups(p, 2)
    assert groups["block_0_attention"].match("backbone.layers.0.mixer.A_log")


# -- overrides ------------------------------------------------------------------------------------
def sizes(spec):
    return {o.block_config_attr: o.config_field for o in spec.overrides}


def test_expert_sizes_are_told_apart_by_the_tensors_they_resize():
    assert sizes(spec_of("qwen2_moe")) == {
        "attention.num_key_value_heads": "num_key_value_heads",
        "ffn.moe.num_local_experts": "num_experts",
        "ffn.moe.num_experts_per_tok": "num_experts_per_tok",
        "ffn.moe.expert_intermediate_dim": "moe_intermediate_size",
        "ffn.moe.shared_expert_intermediate_dim": "shared_expert_intermediate_size",
    }
    # Mixtral's experts read intermediate_size: it is their width, not a dense FFN width
    mixtral = sizes(spec_of("mixtral"))
    assert mixtral["ffn.moe.expert_intermediate_dim"] == "intermediate_size"
    assert "ffn.intermediate_size" not in mixtral


def test_a_field_the_whole_model_reads_is_not_a_per_layer_override():
    """Nemotron-H's weight init sizes every Mamba mixer's A_log by the model's
    mamba_num_heads: one layer with other heads does not build, so no override is emitted."""
    spec = spec_of("nemotron_h")
    assert "attention.mamba.num_heads" not in sizes(spec)
    assert sizes(spec)["attention.mamba.state_dim"] == "ssm_state_size"
    (fact,) = [f for f in spec.facts if f.name.endswith("override (attention.mamba.num_heads)")]
    assert any("does not build" in e for e in fact.evidence)


def test_dense_and_expert_layers_may_share_a_width_field():
    """Jamba's dense MLPs and experts both read intermediate_size: the dense width and the
    expert width both write it, the expert one only for block configs with experts."""
    spec = spec_of("jamba")
    pairs = {(o.block_config_attr, o.config_field) for o in spec.overrides}
    assert ("ffn.intermediate_size", "intermediate_size") in pairs
    assert ("ffn.moe.expert_intermediate_dim", "intermediate_size") in pairs


# -- kinds only other configs build ---------------------------------------------------------------
def test_a_kind_other_configs_build_is_described_too():
    """LFM2's default config has attention layers only; its checkpoints mix in short
    convolutions (layer_types 'conv', a value of transformers' own layer-type vocabulary)."""
    spec = spec_of("lfm2")
    (conv,) = [k for k in spec.kinds if k.built_by]
    assert conv.built_by == "layer_types[i] = 'conv'" and conv.layers == ()
    assert "conv" in [r.attr for r in conv.attention.replacements]
    assert r"conv\..+" in spec.predicates.attention
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from generator.tiny import tiny_config

    config = tiny_config(
        Lfm2Config, layer_types=["full_attention", "conv", "conv", "full_attention"]
    )
    with torch.device("meta"):
        names = list(Lfm2ForCausalLM(config).state_dict())
    predicates.validate(spec.predicates, names, 4, "a config with conv layers")


# -- tiny configs that show every kind ------------------------------------------------------------
def test_tiny_configs_keep_expert_groups_and_periodic_layers():
    from transformers import DeepseekV3Config, JambaConfig

    from generator.tiny import tiny_config

    deepseek = tiny_config(DeepseekV3Config)
    assert deepseek.n_routed_experts % deepseek.n_group == 0  # 4 experts in 1 group, not 8
    assert deepseek.topk_group <= deepseek.n_group
    jamba = tiny_config(JambaConfig)  # attention every 8th layer from layer 4
    assert jamba.num_hidden_layers > jamba.attn_layer_offset


def test_two_token_mixers_on_one_input_are_one_subblock_with_two_cores():
    flow = flow_of(sm.TwoMixerLayer(sm.make_config()))
    attention = flow.subblocks[ATTENTION]
    assert sorted(attention.cores) == ["mamba", "self_attn"]
    assert attention.members[0] == "input_layernorm"
    assert flow.subblocks[FFN].members == ["pre_ff_layernorm", "feed_forward"]
    assert flow.layout == "sequential"  # not an attention / FFN parallel layout


def test_the_oracle_checks_kinds_only_other_configs_build(tmp_path):
    """A descriptor whose no-ops know only LFM2's default attention layers fails `no-ops` on
    a config with a convolution layer; the generated one, which knows both, passes."""
    from transformers import Lfm2Config

    from generator import cli
    from generator.verify import CHECKS, load_descriptor, make_subject, run_check

    out = tmp_path / "gen"
    assert cli.main(["generate", "lfm2", "--out", str(out)]) == 0
    generated = load_descriptor("lfm2", out)

    class AttentionOnly(generated):
        @staticmethod
        def attn_no_op_post_init(decoder_layer):
            from puzzletron_runtime import MatchingZeros, Same, return_tuple_of_size

            decoder_layer.operator_norm = Same()
            decoder_layer.self_attn = return_tuple_of_size(MatchingZeros, size=2)()

    no_ops = next(c for c in CHECKS if c.name == "no-ops")
    subject = make_subject(generated, Lfm2Config)
    result = run_check(subject, no_ops)
    assert result.ok and "layer_types[-1] = 'conv'" in result.detail, result.detail
    subject.descriptor = AttentionOnly
    assert not run_check(subject, no_ops).ok


def test_parameters_of_the_layer_itself_stay_on_a_no_op_and_are_grouped():
    """Doge scales the residual by learned vectors held by the layer itself: the join is still
    found (the residual is a call-free function of the stream), the vectors belong to neither
    subblock's modules and are grouped with the attention, tensor by tensor."""
    spec = spec_of("doge")
    (kind,) = spec.kinds
    assert kind.own_tensors == ("input_residual", "post_attention_residual")
    assert r"input_residual" in spec.predicates.attention
    replaced = {r.attr for sb in (kind.attention, kind.ffn) for r in sb.replacements}
    assert not replaced & set(kind.own_tensors)
    groups = predicates.compile_groups(spec.predicates, 2)
    hits = [g for g, p in groups.items() if p.match("model.layers.1.post_attention_residual")]
    assert hits == ["block_1_attention"]


class _TypedConfig:
    """A config with a per-layer type list, shaped like transformers' (get_text_config)."""

    def __init__(self, layer_types):
        self.hidden_size, self.intermediate_size, self.num_key_value_heads = 8, 16, 2
        self.layer_types = list(layer_types)
        self.num_hidden_layers = len(self.layer_types)

    def get_text_config(self):
        return self


# -- per-layer sizes the whole model reads --------------------------------------------------------
class _WidthConfig:
    def __init__(self, width=8, fail_below=0):
        self.hidden_size, self.width, self.vocab_size = 4, width, 16
        self.num_hidden_layers, self.fail_below = 3, fail_below

    def get_text_config(self):
        return self


class _TypedModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            [sm.TypedBlock(config, i) for i in range(config.num_hidden_layers)]
        )


def test_a_kind_only_the_tiny_config_builds_is_a_kind_other_configs_build(monkeypatch):
    """GraniteMoE-Hybrid's default stack is Mamba only; its tiny config ends in an attention
    layer (as its checkpoints have): that kind is not in the probed stack, so it is described
    as one other configs build, not skipped because the tiny config already has it."""
    monkeypatch.setattr(
        kinds, "_layer_type_vocabularies", lambda: {"layer_types": ("mamba", "attention")}
    )

    class Probe:
        config = _TypedConfig(["mamba"] * 6)

        @staticmethod
        def tiny_config(**changes):
            return _TypedConfig(changes.get("layer_types", ["mamba", "mamba", "attention"]))

    groups = kinds.group_layers(_TypedModel(Probe.config).layers)
    found = kinds.other_config_kinds(Probe, "layers", groups, _TypedModel)
    assert [g.built_by for g in found] == ["layer_types[i] = 'attention'"]
    (layer,) = found[0].modules
    assert isinstance(layer.mixer, sm.Attention) and found[0].layers == []


class _DerivedTypesConfig(_TypedConfig):
    """Bamba: `layer_types` is a property computed from `attn_layer_indices` (no setter)."""

    def __init__(self, n, attention_at=()):
        self.hidden_size, self.intermediate_size, self.num_key_value_heads = 8, 16, 2
        self.num_hidden_layers = n
        self.attn_layer_indices = list(attention_at)

    @property
    def layer_types(self):
        n = self.num_hidden_layers
        return ["attention" if i in self.attn_layer_indices else "mamba" for i in range(n)]


def test_a_kind_whose_type_list_cannot_be_set_is_analysed_on_the_tiny_layer(monkeypatch):
    """The probed config cannot be given the new type (a derived list): the tiny config's
    layer, which has the kind, stands for it."""
    monkeypatch.setattr(
        kinds, "_layer_type_vocabularies", lambda: {"layer_types": ("mamba", "attention")}
    )

    class Probe:
        config = _DerivedTypesConfig(6)

        @staticmethod
        def tiny_config(**changes):
            assert not changes  # the tiny config has the kind already; nothing to set
            return _DerivedTypesConfig(3, attention_at=[2])

    groups = kinds.group_layers(_TypedModel(Probe.config).layers)
    (found,) = kinds.other_config_kinds(Probe, "layers", groups, _TypedModel)
    assert found.built_by == "layer_types[i] = 'attention'" and found.tiny_changes == {}
    (layer,) = found.modules
    assert isinstance(layer.mixer, sm.Attention) and layer.block_type == "attention"


def test_a_persistent_buffer_of_the_layer_itself_is_one_of_its_tensors():
    """Gemma 4 (unified) multiplies each layer's output by `layer_scalar`, a buffer the layer
    holds itself and saves: without it the groups miss one tensor per layer."""
    from generator.layer_kind import own_tensors

    layer = sm.PreNormLayer(sm.make_config())
    layer.register_buffer("layer_scalar", torch.ones(1))
    layer.register_buffer("cache", torch.ones(1), persistent=False)  # not in the state dict
    layer.scale = nn.Parameter(torch.ones(1))
    assert own_tensors(layer) == ("scale", "layer_scalar")
    assert set(own_tensors(layer)) == {
        k for k in layer.state_dict() if "." not in k
    }  # exactly the layer's own state-dict entries


class _WidthLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.width)
        self.down = nn.Linear(config.width, config.hidden_size)

    def forward(self, x, scale):
        return x + self.down(self.up(x) * scale)


class _ModelScale(nn.Module):
    """Like Falcon-H1's mup_vector: one buffer sized by the model's width, given to every
    layer, so one layer of another width builds but cannot run."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_WidthLayer(config, i) for i in range(3))
        self.register_buffer("scale", torch.ones(config.width), persistent=False)

    def forward(self, input_ids):
        if self.config.width < self.config.fail_below:
            raise ValueError("this model never runs so narrow")
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, self.scale)
        return type("Out", (), {"logits": x})()


def test_a_size_one_layer_cannot_run_with_is_not_per_layer():
    from generator.verify.models import layer_change_fails

    failure = layer_change_fails(_ModelScale, _WidthConfig(), "layers", 1, {"width": 4})
    assert failure is not None and "it builds, but its forward fails" in failure
    # the whole model changed fails as well: a size it never runs with, not a per-layer limit
    narrow = _WidthConfig(fail_below=6)
    assert layer_change_fails(_ModelScale, narrow, "layers", 1, {"width": 4}) is None


def test_a_read_only_per_layer_field_is_not_a_choice_of_one_layer():
    """FalconH1Config maps `layer_types` onto a read-only property: trying another value for
    one layer must skip it, not crash the search for kinds other configs build."""
    from transformers import FalconH1Config

    from generator.verify import verification_config
    from generator.verify.checks import other_kind_configs

    config = verification_config(FalconH1Config)
    assert not kinds.settable(config, "layer_types", ["x"])
    assert list(other_kind_configs(config)) == []


# -- a child whose subblock depends on its layer's kind, in layers with both subblocks ------------
def _kind_from_flow(layer, label: str) -> LayerKind:
    """The kind inference builds for `layer`, as far as weight grouping reads it: each
    subblock's children with weights, from the layer's own data flow."""
    flow = flow_of(layer)

    def subblock(which):
        sb = flow.subblocks.get(which)
        if sb is None:
            return None
        weighted = tuple(n for n in sb.members if list(getattr(layer, n).parameters()))
        return Subblock(which, (), weighted, ())

    cls = ClassRef(type(layer).__module__, type(layer).__name__)
    children = tuple(n for n, _ in layer.named_children())
    return LayerKind(
        label, cls, children, (), "sequential", subblock(ATTENTION), subblock(FFN), (), ()
    )


def _by_flow(layer, prefix: str, kept=(ATTENTION, FFN)) -> dict[str, list[str]]:
    """The expected groups of one layer: the tensors below each subblock's data-flow members,
    for the subblocks a no-op left in place."""
    flow, out = flow_of(layer), {}
    for which in kept:
        members = flow.subblocks[which].members
        names = [f"{prefix}.{n}" for n in layer.state_dict() if n.split(".")[0] in members]
        out[f"block_{prefix.rsplit('.', 1)[1]}_{which}"] = sorted(names)
    return out


def test_a_child_in_the_attention_of_one_kind_and_the_ffn_of_another_follows_its_layer_kind():
    """Llama-style layers normalise the FFN input with post_attention_layernorm, OLMo-2-style
    ones the attention output (OLMo-hybrid has both kinds): the predicates cannot name one
    group for it, get_weight_groups decides layer by layer, whole layers and layers a no-op
    left one subblock of (a checkpoint of a heterogeneous model)."""
    config = sm.make_config()
    pre, post = sm.PreNormLayer(config), sm.PostSubblockNormLayer(config)
    kinds_ = [_kind_from_flow(pre, "pre"), _kind_from_flow(post, "post")]
    attention, ffn, tensors, followers, by_kind, table = layer_weights.weight_modules(
        kinds_, [pre, post]
    )
    assert by_kind == ["post_attention_layernorm"] and followers == []
    assert [(k.attention, k.ffn) for k in table] == [
        (("input_layernorm", "self_attn"), ("mlp", "post_attention_layernorm")),
        (("post_attention_layernorm", "self_attn"), ("mlp", "post_feedforward_layernorm")),
    ]
    pred = predicates.build(["embed"], ["head"], "layers", attention, ffn, tensors)
    # layers 0, 1 whole; 2 without its attention, 3 without its FFN, 4 without its attention,
    # 5 without its FFN (what a heterogeneous checkpoint holds)
    stack = [(pre, (ATTENTION, FFN)), (post, (ATTENTION, FFN)), (pre, (FFN,))]
    stack += [(post, (ATTENTION,)), (post, (FFN,)), (pre, (ATTENTION,))]
    want: dict[str, list[str]] = {}
    for i, (layer, kept) in enumerate(stack):
        want.update(_by_flow(layer, f"layers.{i}", kept))
    names = [n for group in want.values() for n in group]
    compiled = predicates.compile_groups(pred, len(stack))
    base = group_names(list(compiled.items()), names, "test")
    rows = [(k.attention, k.ffn) for k in table]
    got = group_by_layer_kind(base, len(stack), r"layers", tuple(by_kind), rows)
    assert {k: sorted(v) for k, v in got.items()} == want
    assert {k: sorted(v) for k, v in base.items()} != want  # the predicates alone are wrong


def test_layer_kinds_their_children_do_not_tell_apart_are_refused():
    """Two kinds with the same children, a norm before the attention in one and before the MLP
    in the other: no name tells a layer's kind, so generating stops and says so."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mixer = nn.Linear(2, 2), nn.Linear(2, 2)
            self.other_norm, self.mlp = nn.Linear(2, 2), nn.Linear(2, 2)

    cls = ClassRef(__name__, "Layer")
    children = ("norm", "mixer", "other_norm", "mlp")

    def kind(label, attention, ffn):
        return LayerKind(
            label,
            cls,
            children,
            (),
            "sequential",
            Subblock(ATTENTION, (), attention, ()),
            Subblock(FFN, (), ffn, ()),
            (),
            (),
        )

    a = kind("a", ("norm", "mixer"), ("other_norm", "mlp"))
    b = kind("b", ("other_norm", "mixer"), ("norm", "mlp"))
    with pytest.raises(InferenceError, match="the children of a layer do not tell its kind"):
        layer_weights.weight_modules([a, b], [Layer(), Layer()])


def test_split_roles_asks_every_kind_that_fits():
    kinds_ = [
        (("input_layernorm", "linear_attn"), ("post_attention_layernorm", "mlp")),
        (("self_attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm")),
    ]
    split = ("post_attention_layernorm",)
    assert split_roles(["self_attn", "post_attention_layernorm"], split, kinds_) == {
        "post_attention_layernorm": "attention"
    }
    # no linear_attn left (an attention no-op): still the first kind, by its MLP
    assert split_roles(["post_attention_layernorm", "mlp"], split, kinds_) == {
        "post_attention_layernorm": "ffn"
    }
    assert split_roles(["mlp", "post_feedforward_layernorm"], split, kinds_) == {}
    with pytest.raises(ValueError, match="none fits"):
        split_roles(["post_attention_layernorm", "mlp", "conv"], split, kinds_)


def test_disk_spellings_of_layer_children_join_their_kinds():
    """OLMo-hybrid's checkpoints spell post_attention_layernorm `feedforward_layer_norm`: the
    table and the kind-decided children carry both spellings."""
    table = (
        KindChildren("a", ("input_layernorm",), ("post_attention_layernorm", "mlp")),
        KindChildren("b", ("post_attention_layernorm", "self_attn"), ("mlp",)),
    )
    layer = "model.layers.0."
    disk = {
        layer + "feedforward_layer_norm.weight": layer + "post_attention_layernorm.weight",
        layer + "attention_layer_norm.weight": layer + "input_layernorm.weight",
        "model.layers.1.mlp.up.weight": "model.layers.1.mlp.up.weight",
    }
    split, rows = layer_weights.with_disk_children(
        ("post_attention_layernorm",), table, disk, r"model\.layers"
    )
    assert split == ("post_attention_layernorm", "feedforward_layer_norm")
    assert rows[0].attention == ("input_layernorm", "attention_layer_norm")
    assert rows[1].attention == ("post_attention_layernorm", "self_attn", "feedforward_layer_norm")
    assert rows[1].ffn == ("mlp",)


def test_the_oracle_checks_a_kind_decided_child_layer_by_layer():
    """OLMo-hybrid's generated descriptor passes the weight-group check; one that groups
    post_attention_layernorm as the predicates list it (with the attention in every layer),
    or with the FFN in every layer (as the linear-attention layers have it), fails it, naming a
    layer of the kind it gets wrong."""
    import generated
    from generator.source import resolve
    from generator.verify import CHECKS, make_subject, run_check
    from puzzletron_runtime.model_descriptor import ModelDescriptor

    base = generated.get_descriptor("olmo_hybrid")
    subject = make_subject(base, resolve("olmo_hybrid").config_cls)
    check = next(c for c in CHECKS if c.name == "weight groups")
    assert run_check(subject, check).ok

    class PredicatesOnly(base):
        @classmethod
        def get_weight_groups(cls, layer_names, num_hidden_layers):
            return ModelDescriptor.get_weight_groups.__func__(cls, layer_names, num_hidden_layers)

    class AllFFN(base):
        @classmethod
        def get_weight_groups(cls, layer_names, num_hidden_layers):
            groups = ModelDescriptor.get_weight_groups.__func__(cls, layer_names, num_hidden_layers)
            for i in range(num_hidden_layers):
                attention = groups.get(f"block_{i}_attention", [])
                moving = [n for n in attention if ".post_attention_layernorm." in n]
                groups[f"block_{i}_attention"] = [n for n in attention if n not in moving]
                groups[f"block_{i}_ffn"] = moving + groups.get(f"block_{i}_ffn", [])
            return groups

    full = [
        i for i in range(subject.n) if "self_attn" in str(subject.reference.roles(i).describe())
    ]
    assert full and len(full) < subject.n  # both kinds in the tiny stack
    for mutant, wrong_layer in ((PredicatesOnly, 0), (AllFFN, full[0])):
        mutated = copy.copy(subject)  # shares the reference model already built
        mutated.descriptor = mutant
        result = run_check(mutated, check)
        assert not result.ok, mutant.__name__
        assert f"layer {wrong_layer}'s" in result.detail, result.detail


def test_a_kind_only_the_tiny_config_builds_is_found_without_transformers_vocabulary(monkeypatch):
    """transformers before 5.15 (Model Optimizer's range) lists no allowed layer types: Bamba's
    default stack is all Mamba, its tiny config ends in an attention layer (from
    attn_layer_indices), and that value of the tiny config's own `layer_types` is tried."""
    monkeypatch.setattr(kinds, "_layer_type_vocabularies", lambda: {"layer_types": ()})
    spec = infer("bamba")
    children = [set(k.children) for k in spec.kinds]
    assert any("self_attn" in c for c in children) and any("mamba" in c for c in children)



class _WindowedBlock(sm.TypedBlock):
    """LFM2 under transformers 5.14: a second value ('windowed', listed first) builds the same
    layer as 'attention'; a stack typed so cannot run where the config has no window."""

    MIXERS = {**sm.TypedBlock.MIXERS, "windowed": sm.Attention}


class _WindowedModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            [_WindowedBlock(config, i) for i in range(config.num_hidden_layers)]
        )


def test_a_kind_two_values_build_keeps_the_later_value_to_try(monkeypatch):
    """transformers 5.14's single layer-type list puts 'sliding_attention' before 'conv', and
    LFM2 builds its short convolution for both; the first value's stack cannot run (LFM2's
    config has no window), so inference tries the next value that builds the kind."""
    monkeypatch.setattr(
        kinds, "_layer_type_vocabularies", lambda: {"layer_types": ("windowed", "attention")}
    )

    class Probe:
        config = _TypedConfig(["mamba"] * 6)

        @staticmethod
        def tiny_config(**changes):
            return _TypedConfig(changes.get("layer_types", ["mamba"] * 3))

    groups = kinds.group_layers(_WindowedModel(Probe.config).layers)
    (found,) = kinds.other_config_kinds(Probe, "layers", groups, _WindowedModel)
    assert found.built_by == "layer_types[i] = 'windowed'"
    later = kinds.next_alternative(found)
    assert later.built_by == "layer_types[i] = 'attention'"
    assert later.tiny_changes == {"layer_types": ["mamba", "mamba", "attention"]}
    (layer,) = later.modules
    assert isinstance(layer.mixer, sm.Attention) and layer.block_type == "attention"
    assert kinds.next_alternative(later) is None
