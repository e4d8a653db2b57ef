"""Drop-in modules: :class:`SparseLinear`, :func:`sparsify` / :func:`densify`.

SparseLinear runs through the ``sparsekit::*`` torch.library custom ops of :mod:`sparsekit.ops`
(registered at ``import sparsekit``) under eager, ``torch.compile`` and ``torch.export``.
"""

from sparsekit.nn.attention import SparseMultiheadAttention
from sparsekit.nn.conv import SparseConv2d
from sparsekit.nn.linear import FusedActivation, SparseLinear, heuristic_choice
from sparsekit.nn.sparsify import (
    LayerReport,
    SparsifyReport,
    clear_tune_cache,
    densify,
    sparsify,
)

__all__ = [
    "SparseLinear",
    "FusedActivation",
    "SparseConv2d",
    "SparseMultiheadAttention",
    "sparsify",
    "densify",
    "SparsifyReport",
    "LayerReport",
    "heuristic_choice",
    "clear_tune_cache",
]
