"""PassResidual: the no-op stand-in of a module that adds the residual it is passed."""

import pytest
import torch

from puzzletron_runtime.puzzformer.no_op import PassResidual, return_tuple_of_size


def test_returns_the_residual_passed_positionally_or_by_keyword():
    x, residual = torch.randn(2, 3), torch.randn(2, 3)
    assert PassResidual(1, "residual")(x, residual) is residual
    assert PassResidual(1, "residual")(x, residual=residual) is residual
    assert PassResidual(None, "residual")(x, residual=residual) is residual


def test_tuple_wrapper_keeps_the_arguments():
    x, residual = torch.randn(2, 3), torch.randn(2, 3)
    stand_in = return_tuple_of_size(PassResidual, 2)(1, "residual")
    out, extra = stand_in(x, residual, attention_mask=None)
    assert out is residual and extra is None
    assert not list(stand_in.parameters())


def test_missing_residual_is_an_error():
    with pytest.raises(TypeError, match="residual"):
        PassResidual(1, "residual")(torch.randn(2))
