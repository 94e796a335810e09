"""Pure-PyTorch specifications of every op: readable first, loops or plain torch, no tricks.
They are the spec the native kernels are tested against and the fallback path."""

from .catalogue_score import catalogue_score
from .embedding_bags import embedding_bags
from .ensemble_topk import ensemble_topk
from .expert_gate_mixture import expert_gate_mixture
from .gated_mixture import gated_mixture
from .multi_task_score import multi_task_score
from .relu_dropout import relu_dropout

__all__ = ["catalogue_score", "embedding_bags", "ensemble_topk", "expert_gate_mixture", "gated_mixture", "multi_task_score", "relu_dropout"]
