"""Building heterogeneous models: the decoder-layer patcher and the no-op stand-ins."""

from .no_op import (
    MatchingZeros,
    PassResidual,
    ProjectedZeros,
    Same,
    return_list_of_size,
    return_tuple_carrying,
    return_tuple_of_size,
)
from .patcher import deci_x_patcher

__all__ = [
    "MatchingZeros",
    "PassResidual",
    "ProjectedZeros",
    "Same",
    "deci_x_patcher",
    "return_list_of_size",
    "return_tuple_carrying",
    "return_tuple_of_size",
]
