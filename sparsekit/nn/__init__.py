"""Drop-in modules: :class:`SparseLinear`, :func:`sparsify` / :func:`densify`.

Importing this package registers the ``sparsekit::*`` torch.library custom ops
(:mod:`sparsekit.nn._ops`) used by SparseLinear under eager, ``torch.compile`` and
``torch.export``.
"""

from sparsekit.nn import _ops  # noqa: F401  (registers torch.ops.sparsekit.*)
from sparsekit.nn.attention import SparseMultiheadAttention
from sparsekit.nn.conv import SparseConv2d
from sparsekit.nn.linear import SparseLinear
from sparsekit.nn.sparsify import (
    LayerReport,
    SparsifyReport,
    clear_tune_cache,
    densify,
    heuristic_choice,
    sparsify,
)

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "SparseMultiheadAttention",
    "sparsify",
    "densify",
    "SparsifyReport",
    "LayerReport",
    "heuristic_choice",
    "clear_tune_cache",
]
