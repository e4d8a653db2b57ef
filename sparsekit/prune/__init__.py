"""Pruning toolkit: one-shot and gradual pruning with exact, hardware-friendly sparsity patterns.

>>> from sparsekit.prune import prune, GradualPruner, evaluate
>>> report = prune(model, 0.9, criterion="l1", granularity="unstructured",
...                exclude="fc3")                                    # doctest: +SKIP
>>> print(report)                                                    # doctest: +SKIP

See ``docs/pruning.md`` for a guide (which method when, costs, measured quality).
"""

from ._core import SUPPORTED_TYPES, LayerReport, PruneReport
from ._masks import Granularity, parse_granularity
from .allocation import OWL, owl_sparsities
from .criteria import CRITERIA
from .distill import DistillReport, distill
from .evaluate import (
    Evaluation,
    embedding_cosine,
    evaluate,
    logit_kl,
    mean_pooled_embeddings,
    neighbour_agreement,
    perplexity,
)
from .gradual import SCHEDULES, GradualPruner, sparsity_schedule
from .oneshot import prune

__all__ = ["prune", "GradualPruner", "sparsity_schedule", "evaluate", "Evaluation",
           "PruneReport", "LayerReport", "Granularity", "parse_granularity", "CRITERIA",
           "SCHEDULES", "SUPPORTED_TYPES", "distill", "DistillReport", "embedding_cosine",
           "neighbour_agreement", "logit_kl", "mean_pooled_embeddings", "perplexity",
           "OWL", "owl_sparsities"]
