"""The functional ops. Each calls the native kernel (torch.ops.mtkernels.*) when it is built for
the input's device and falls back to the pure-PyTorch reference otherwise."""

from .catalogue_score import CatalogueScoreParams, catalogue_score, split_first_layer
from .embedding_bags import FusedEmbeddingOptimizer, embedding_bags
from .ensemble_topk import ensemble_topk
from .expert_gate_mixture import expert_gate_mixture
from .gated_mixture import gated_mixture
from .multi_task_score import MultiTaskScoreParams, multi_task_score, pack_multi_task_params
from .relu_dropout import relu_dropout

__all__ = [
    "catalogue_score",
    "CatalogueScoreParams",
    "split_first_layer",
    "embedding_bags",
    "FusedEmbeddingOptimizer",
    "ensemble_topk",
    "expert_gate_mixture",
    "gated_mixture",
    "multi_task_score",
    "MultiTaskScoreParams",
    "pack_multi_task_params",
    "relu_dropout",
]
