"""Static analysis on synthetic modeling sources (tests/synthetic_models.py)."""

from pathlib import Path

import pytest
import synthetic_models as sm

from generator.analysis import model_structure
from generator.analysis.layer_flow import ATTENTION, FFN, analyze_layer
from generator.analysis.source_index import SourceIndex
from generator.errors import InferenceError
from generator.probe import layer_children

SOURCE = Path(sm.__file__).name


def flow_of(layer_cls, **config):
    layer = layer_cls(sm.make_config(**config))
    return analyze_layer(layer_cls, layer, layer_children(layer), SourceIndex())


def members(flow, kind):
    return flow.subblocks[kind].members


def test_pre_norm_layer_segments_and_arity():
    flow = flow_of(sm.PreNormLayer)
    assert flow.layout == "sequential"
    assert members(flow, ATTENTION) == ["input_layernorm", "self_attn"]
    assert members(flow, FFN) == ["post_attention_layernorm", "mlp"]
    assert flow.subblocks[ATTENTION].cores == ["self_attn"]
    assert flow.subblocks[FFN].cores == ["mlp"]
    assert flow.arity["self_attn"] == 2
    assert flow.arity["mlp"] is None
    assert flow.shared == []
    assert flow.returns_tuple is False
    # evidence points at the residual joins in this file
    assert all(j.startswith(f"{SOURCE}:") for j in flow.subblocks[FFN].joins)


def test_tuple_unpacking_arity_of_three_and_tuple_return():
    flow = flow_of(sm.TripleArityLayer)
    assert flow.arity["self_attn"] == 3
    assert flow.returns_tuple is True
    assert members(flow, FFN) == ["post_attention_layernorm", "mlp"]


def test_indexed_output_is_a_tuple_of_unknown_size():
    flow = flow_of(sm.IndexedOutputLayer)
    assert flow.indexed["self_attn"] is True
    assert flow.arity["self_attn"] is None  # the trace decides the size
    assert members(flow, ATTENTION) == ["input_layernorm", "self_attn"]


def test_four_norm_layer_follows_data_flow_not_names():
    flow = flow_of(sm.FourNormLayer)
    # post_attention_layernorm normalises the attention output: attention segment
    assert members(flow, ATTENTION) == ["input_layernorm", "self_attn", "post_attention_layernorm"]
    assert members(flow, FFN) == ["pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"]


def test_post_norm_layer_keeps_stream_norms_in_place():
    """A norm applied to the residual stream itself (after a join) shapes everything the layer
    computes later: with a subblock's contribution zeroed it still runs, so it belongs to
    neither subblock and stays in place on a no-op (like a parallel layout's shared norm)."""
    flow = flow_of(sm.PostNormLayer, do_layer_norm_before=False)
    assert members(flow, ATTENTION) == ["self_attn"]
    # fc1 -> fc2 is a chain: only fc2 (the sink) becomes zeros, fc1 is bypassed
    assert members(flow, FFN) == ["fc1", "fc2"]
    assert flow.shared == ["self_attn_layer_norm", "final_layer_norm"]
    assert flow.subblocks[FFN].cores == ["fc2"]
    assert flow.returns_tuple is True


def test_post_norm_layer_pre_norm_branch_is_decided_by_the_instance():
    flow = flow_of(sm.PostNormLayer, do_layer_norm_before=True)
    assert members(flow, ATTENTION) == ["self_attn_layer_norm", "self_attn"]
    assert members(flow, FFN) == ["final_layer_norm", "fc1", "fc2"]


def test_parallel_layer_with_shared_norm():
    flow = flow_of(sm.ParallelLayer)
    assert flow.layout == "parallel"
    assert flow.shared == ["ln_1"]
    assert members(flow, ATTENTION) == ["attn"]
    assert members(flow, FFN) == ["mlp"]
    assert flow.subblocks[ATTENTION].joins == flow.subblocks[FFN].joins  # one join


def test_parallel_residual_decided_by_config_attribute():
    parallel = flow_of(sm.ParallelTwoNormLayer, use_parallel_residual=True)
    assert parallel.layout == "parallel"
    assert parallel.shared == []
    assert members(parallel, ATTENTION) == ["input_layernorm", "attention"]
    assert members(parallel, FFN) == ["post_attention_layernorm", "mlp"]

    sequential = flow_of(sm.ParallelTwoNormLayer, use_parallel_residual=False)
    assert sequential.layout == "sequential"
    assert members(sequential, ATTENTION) == ["input_layernorm", "attention"]
    assert members(sequential, FFN) == ["post_attention_layernorm", "mlp"]


@pytest.mark.parametrize("parallel", [True, False])
def test_dropout_add_joins_and_in_place_merge(parallel):
    flow = flow_of(sm.DropoutAddLayer, parallel_attn=parallel)
    if parallel:
        assert flow.layout == "parallel"
        assert flow.shared == ["input_layernorm"]
        assert members(flow, ATTENTION) == ["self_attention"]
    else:
        assert flow.layout == "sequential"
        assert members(flow, ATTENTION) == ["input_layernorm", "self_attention"]
        assert members(flow, FFN) == ["post_attention_layernorm", "mlp"]


def test_helper_method_is_inlined():
    flow = flow_of(sm.HelperMethodLayer)
    assert members(flow, FFN) == ["post_attention_layernorm", "mlp"]


def test_residual_passed_into_the_subblock_joins_inside_it():
    """Bloom / MPT: `self.mlp(norm(x), x)` where the module adds `x` to its own output. Without
    the rule, the main stream stops at a call that combines two streams."""
    flow = flow_of(sm.ResidualIntoSubblockLayer)
    assert flow.layout == "sequential"
    attn, ffn = flow.subblocks[ATTENTION], flow.subblocks[FFN]
    assert attn.members == ["input_layernorm", "self_attention"]
    assert ffn.members == ["post_attention_layernorm", "mlp"]
    # positional at the attention call, by keyword at the MLP call
    assert attn.residual_args == {"self_attention": (1, "residual")}
    assert ffn.residual_args == {"mlp": (None, "residual")}
    assert flow.arity["self_attention"] == 2


def test_residual_passed_in_but_not_added_is_not_a_join():
    with pytest.raises(InferenceError, match="combines several streams"):
        flow_of(sm.ResidualGatedLayer)


def test_child_adding_its_own_input_is_a_join_inside_it():
    """CPM-Ant: `self.self_att(x)` returns `x + attention(norm(x))`. Without the rule the layer
    has no residual join at all."""
    flow = flow_of(sm.BlocksOwnTheirResidualLayer)
    attn, ffn = flow.subblocks[ATTENTION], flow.subblocks[FFN]
    assert attn.members == ["self_att"] and ffn.members == ["ffn"]
    assert attn.residual_args == {"self_att": (0, "hidden_states")}
    assert ffn.residual_args == {"ffn": (0, "hidden_states")}


def test_core_adding_its_input_to_its_output_takes_the_kind_of_the_core_it_refines():
    """Inkling: a short convolution fed the cache follows the attention and the MLP; it adds its
    input to its output, so each segment is what the core before it is. Without the rule both
    segments end in a core fed context: two attention segments."""
    flow = flow_of(sm.RefinedSegmentsLayer)
    attn, ffn = flow.subblocks[ATTENTION], flow.subblocks[FFN]
    assert attn.members == ["input_layernorm", "self_attn", "attn_conv"]
    assert ffn.members == ["post_attention_layernorm", "mlp", "mlp_conv"]
    # the last core becomes zeros; the core before it decided the kind
    assert (attn.cores, attn.judges) == (["attn_conv"], ["self_attn"])
    assert (ffn.cores, ffn.judges) == (["mlp_conv"], ["mlp"])


def test_context_fed_core_after_the_mlp_that_does_not_refine_it_is_refused():
    """The same layer whose convolutions do not add their input: the MLP segment ends in a
    token mixer fed context, and the layer has two attention segments."""
    with pytest.raises(InferenceError, match="two attention segments"):
        flow_of(sm.UnrefinedSegmentsLayer)


def test_a_segment_mixing_in_a_per_layer_input_joins_the_ffn_subblock():
    """Gemma 4: the segment after the MLP multiplies the stream by a layer argument and reads no
    context: a second FFN segment, one FFN subblock with two joins and two cores (without the
    rule: "two ffn segments in one layer")."""
    flow = flow_of(sm.PerLayerInputLayer)
    ffn = flow.subblocks[FFN]
    assert ffn.cores == ["mlp", "per_layer_projection"]
    assert members(flow, FFN) == [
        "post_attention_layernorm",
        "mlp",
        "per_layer_input_gate",
        "act_fn",
        "per_layer_projection",
        "post_per_layer_input_norm",
    ]
    assert len(ffn.joins) == 2
    (where,) = ffn.layer_inputs
    assert where == f"{SOURCE}:{_line_of('hidden_states = hidden_states * per_layer_input')}"
    assert members(flow, ATTENTION) == ["input_layernorm", "self_attn"]
    assert flow.subblocks[ATTENTION].layer_inputs == []


def test_a_second_ffn_segment_on_the_hidden_states_alone_is_still_refused():
    with pytest.raises(InferenceError, match="two ffn segments"):
        flow_of(sm.TwoPlainMLPLayer)


def test_modules_called_in_helper_methods_before_the_loop_run_before_it():
    """Gemma 4 computes its per-layer inputs in methods the forward calls before the loop: their
    modules are part of what runs before layer 0 (without the rule only embed_tokens)."""
    loop = loop_of(sm.PerLayerInputModel, "layers")
    assert loop.before_loop == [
        "embed_tokens",
        "embed_tokens_per_layer",
        "per_layer_model_projection",
    ]
    assert loop.final_norm == "norm"


def test_layer_without_residual_is_an_inference_error():
    with pytest.raises(InferenceError, match="residual"):
        flow_of(sm.NoResidualLayer)


def loop_of(model_cls, stack):
    model = model_cls(sm.make_config())
    children = {n for n, _ in model.named_children()}
    return model_structure.analyze_loop(SourceIndex(), model_cls, stack, children)


def test_model_loop_reads_layer_attribute_and_final_norm():
    loop = loop_of(sm.ToyModel, "layers")
    assert loop.loop_var == "decoder_layer"
    assert loop.layer_attributes == ["attention_type"]
    assert loop.returns_tuple is False
    assert loop.final_norm == "norm"
    assert loop.before_loop == ["embed_tokens", "embed_positions"]


def test_tuple_loop_without_final_norm():
    loop = loop_of(sm.TupleLoopModel, "h")
    assert loop.loop_var == "block"
    assert loop.returns_tuple is True
    assert loop.final_norm is None
    assert loop.layer_attributes == []


def test_loop_unpacking_several_values_from_a_layer_counts_them():
    """A dummy block must return as many values as the loop unpacks (GLM-MoE-DSA's layers
    return the hidden states and the top-k indices the next layer reuses)."""
    loop = loop_of(sm.UnpackingLoopModel, "layers")
    assert loop.returns_tuple is True and loop.tuple_size == 2  # the starred rest may be empty
    assert loop_of(sm.TupleLoopModel, "h").tuple_size == 1  # `outputs[0]`: a 1-tuple will do
    assert loop_of(sm.ToyModel, "layers").tuple_size == 1


def test_the_final_norm_is_the_outermost_module_called_on_the_hidden_states():
    loop = loop_of(sm.HeadBeforeNormModel, "layers")
    assert loop.final_norm == "norm"
    assert loop.after_loop == ["hc_head"]  # grouped with the head, like OPT's project_out


def test_zip_loop_with_keyword_hidden_states():
    loop = loop_of(sm.ZipLoopModel, "layers")
    assert loop.loop_var == "layer"
    assert loop.hidden_var == "hidden_states"
    assert loop.final_norm == "final_layernorm"


def test_find_stacks_reads_the_module_list_comprehension():
    stacks = model_structure.find_stacks(SourceIndex(), sm.ToyModel)
    assert [(s.attr, s.element_classes) for s in stacks] == [("layers", ("PreNormLayer",))]
    assert "config.num_hidden_layers" in stacks[0].count


def test_find_stacks_follows_a_method_that_returns_the_module_list():
    (stack,) = model_structure.find_stacks(SourceIndex(), sm.StackFromMethodModel)
    assert stack.attr == "layers"
    assert "self.layers = self.get_layers()" in stack.code and "ModuleList" in stack.code
    assert stack.where.endswith(":" + str(_line_of("return nn.ModuleList(layers)")))


def _line_of(text):
    lines = open(sm.__file__).read().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_config_reads_of_init():
    reads = [f for f, _ in model_structure.config_reads(SourceIndex(), sm.MLP)]
    assert reads == ["hidden_size", "intermediate_size", "intermediate_size", "hidden_size"]


def test_construction_of_a_child():
    cons = model_structure.find_construction(SourceIndex(), sm.PreNormLayer, "mlp")
    assert cons.callee == "MLP"
    assert [kw for kw, _ in cons.args] == [None]


def test_config_reads_follow_a_layer_s_view_of_a_heterogeneous_config():
    reads = dict(model_structure.config_reads(SourceIndex(), sm.PerLayerConfigAttention))
    assert "num_key_value_heads" in reads and "hidden_size" in reads


def test_a_child_handing_on_two_streams_is_read_through():
    """DBRX: `resid, x = self.norm_attn_norm(x)` runs the attention segment, its join and the
    FFN's norm inside one child. Without the rule the main stream stops at that call; with it
    the child's children are units at their dotted paths, its second norm in the FFN."""
    flow = flow_of(sm.NestedSegmentLayer)
    assert flow.containers == ("norm_attn_norm",)
    attn, ffn = flow.subblocks[ATTENTION], flow.subblocks[FFN]
    assert attn.members == ["norm_attn_norm.norm_1", "norm_attn_norm.attn"]
    assert attn.cores == ["norm_attn_norm.attn"]
    assert ffn.members == ["norm_attn_norm.norm_2", "ffn"]
    assert ffn.cores == ["ffn"]
    assert flow.arity["norm_attn_norm.attn"] == 2
    assert flow.shared == []


def test_a_child_handing_on_one_stream_and_a_parameter_is_a_core():
    """GPT-NeoX-Japanese: `out, bias = self.attention(x)`, both added to the residual. Only the
    output is computed from the attention's input, so the attention stays a core (read through,
    its projections would be split into two subblocks)."""
    flow = flow_of(sm.BiasAddedLaterLayer)
    assert flow.containers == ()
    assert flow.subblocks[ATTENTION].cores == ["self_attn"]
    assert members(flow, FFN) == ["post_attention_layernorm", "mlp"]
