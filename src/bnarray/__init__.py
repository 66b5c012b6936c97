"""Batch normalization written once against the Python array API standard."""

from . import sync
from ._core import (
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
    update_running_stats,
)
from ._layer import BatchNorm
from ._moments import population_stats
from ._variants import Renorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormContext",
    "Renorm",
    "__version__",
    "batch_norm_backward",
    "batch_norm_forward",
    "population_stats",
    "sync",
    "update_running_stats",
]
