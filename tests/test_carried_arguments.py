"""Arguments a module returns unchanged (a recurrent state): read from its source, and handed
back by the no-op stand-ins and dummy blocks that replace it (RWKV)."""

import dataclasses

import pytest
import torch

import synthetic_models as sm
from generator.analysis.source_index import SourceIndex
from generator import render
from generator.spec import CarriedArgument, SpecError, check_renderable
from generator.static_returns import carried_arguments
from puzzletron_runtime.puzzformer.no_op import (
    MatchingZeros,
    return_tuple_carrying,
    return_tuple_of_size,
)
from puzzletron_runtime.utils.dummy_modules import DummyBlock


def carried(module):
    return carried_arguments(module, SourceIndex())


def test_a_state_handed_back_through_a_helper_is_carried():
    assert carried(sm.StateMixer(sm.make_config())) == {1: ("state", 1)}


def test_a_child_that_hands_back_what_it_was_given_carries_the_layer_argument():
    # the block returns the state its channel mix returned (passed positionally), which is
    # the one its time mix returned (passed by keyword): the block's own argument
    layer = sm.RecurrentStateLayer(sm.make_config())
    assert carried(layer) == {1: ("state", 1)}


@pytest.mark.parametrize(
    "module",
    [
        sm.FreshStateMixer,
        sm.SometimesStateMixer,
        sm.UntupledStateMixer,
        sm.Attention,
        sm.FreshStateLayer,
    ],
    ids=lambda c: c.__name__,
)
def test_a_computed_value_or_one_path_only_is_not_carried(module):
    assert carried(module(sm.make_config())) == {}


def test_the_stand_in_hands_back_the_argument_it_was_given():
    x, state = torch.ones(1, 3, 8), [torch.zeros(1, 8)]
    stand_in = return_tuple_carrying(MatchingZeros, 2, ((1, "state", 1),))()
    out, handed = stand_in(x, state=state)
    assert torch.equal(out, torch.zeros_like(x)) and handed is state
    assert stand_in(x, state)[1] is state  # passed positionally
    assert stand_in(x)[1] is None  # left out: the default
    # what the plain tuple stand-in did: the caller lost its state
    assert return_tuple_of_size(MatchingZeros, 2)()(x, state=state)[1] is None


def test_a_layer_with_a_no_op_keeps_the_state_the_caller_threads_on():
    layer = sm.RecurrentStateLayer(sm.make_config())
    state = [torch.zeros(1, 8)]
    layer.mixer = return_tuple_carrying(MatchingZeros, 2, ((1, "state", 1),))()
    layer.channel = return_tuple_carrying(MatchingZeros, 2, ((1, "state", 1),))()
    hidden, handed, _ = layer(torch.ones(1, 3, 8), state=state)
    assert handed is state and torch.equal(hidden, torch.ones(1, 3, 8))


def test_a_dummy_block_hands_back_the_carried_argument():
    x, state = torch.ones(1, 3, 8), [torch.zeros(1, 8)]
    dummy = DummyBlock(0, returns_tuple=True, tuple_size=3, carried=((1, "state", 1),))
    assert dummy(x, state=state) == (x, state, None)
    assert dummy(x, state)[1] is state
    with pytest.raises(ValueError):
        DummyBlock(0, returns_tuple=True, tuple_size=2, carried=((2, "state", 1),))


def _with_carried(spec, dummy_carried, attention_carried):
    """llama's spec with its attention stand-in and its dummy block handing back `state`."""
    (kind,) = spec.kinds
    plan = tuple(
        dataclasses.replace(r, carried=attention_carried) if r.tuple_size else r
        for r in kind.attention.replacements
    )
    attention = dataclasses.replace(kind.attention, replacements=plan)
    dummy = dataclasses.replace(spec.dummy_block, returns_tuple=True, tuple_size=3)
    return dataclasses.replace(
        spec,
        kinds=(dataclasses.replace(kind, attention=attention),),
        dummy_block=dataclasses.replace(dummy, carried=dummy_carried),
    )


def test_a_rendered_descriptor_hands_back_the_carried_arguments():
    from test_emit_safety import base_spec, execute

    state = CarriedArgument(1, "state", 1)
    spec = _with_carried(base_spec(), (state,), (state,))
    source = render.render_descriptor(spec)
    assert "return_tuple_carrying(" in source and 'carried=((1, "state", 1),)' in source
    descriptor = next(
        v
        for v in execute(source).values()
        if isinstance(v, type)
        and hasattr(v, "layer_block_name")
        and v.__module__ == "_emit_safety_descriptor"
    )
    x, given = torch.ones(1, 3, 8), [torch.zeros(1)]
    assert descriptor.create_dummy_block(None, 0)(x, state=given) == (x, given, None)
    layer = torch.nn.Module()
    layer.self_attn = layer.input_layernorm = torch.nn.Identity()
    descriptor.attn_no_op_post_init(layer)
    assert layer.self_attn(x, state=given)[1] is given


@pytest.mark.parametrize(
    "carried",
    [
        (CarriedArgument(1, "st ate", 1),),  # not an identifier: it would reach code
        (CarriedArgument(3, "state", 1),),  # outside the tuple of 3
        (CarriedArgument(1, "state", 1), CarriedArgument(1, "cache", 2)),  # one place twice
    ],
)
def test_carried_arguments_that_are_not_renderable_are_refused(carried):
    from test_emit_safety import base_spec

    with pytest.raises(SpecError):
        check_renderable(_with_carried(base_spec(), carried, ()))
