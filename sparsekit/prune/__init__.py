"""Pruning toolkit: one-shot and gradual pruning with exact, hardware-friendly sparsity patterns.

>>> from sparsekit.prune import prune, GradualPruner, evaluate
>>> report = prune(model, 0.9, criterion="l1", granularity="unstructured",
...                exclude="fc3")                                    # doctest: +SKIP
>>> print(report)                                                    # doctest: +SKIP

See the README section "Pruning".
"""

from ._core import SUPPORTED_TYPES, LayerReport, PruneReport
from ._masks import Granularity, parse_granularity
from .criteria import CRITERIA
from .evaluate import Evaluation, evaluate
from .gradual import SCHEDULES, GradualPruner, sparsity_schedule
from .oneshot import prune

__all__ = ["prune", "GradualPruner", "sparsity_schedule", "evaluate", "Evaluation",
           "PruneReport", "LayerReport", "Granularity", "parse_granularity", "CRITERIA",
           "SCHEDULES", "SUPPORTED_TYPES"]
