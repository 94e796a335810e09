"""`mtkernels.nn`: the modules of a multi-task recommender.

- `EmbeddingBagCollection` / `EmbeddingBagConfig`: all sparse features pooled by one
  `mtkernels.ops.embedding_bags` call (optionally with a fused row-wise Adagrad/SGD update).
- Backbones `SharedBottom`, `MMoE` (Ma et al., KDD 2018), `PLE` (Tang et al., RecSys 2020),
  `ESMM` (Ma et al., SIGIR 2018); the MLP blocks `Expert` and `TaskTower`.
- `MultiTaskModel`: features -> backbone -> towers -> ``[B, T]`` predictions, fused scoring in eval;
  optionally an explicit biased-MF term (`InteractionTerm`) added to chosen tasks.
- `ItemKNN`, `EASE`, `SequentialRules`: item-item collaborative filtering (cosine kNN; Steck's
  closed-form autoencoder; sequential rules over time-ordered histories), members of score fusion.
"""

from .cf import EASE, ItemItemCF, ItemKNN, SequentialRules
from .backbones import CGC, ESMM, MMoE, MultiTaskBackbone, PLE, SharedBottom
from .embedding import EmbeddingBagCollection, EmbeddingBagConfig
from .interaction import InteractionTerm
from .model import BACKBONES, MultiTaskModel
from .towers import Expert, TaskTower

__all__ = [
    "EmbeddingBagConfig", "EmbeddingBagCollection", "Expert", "TaskTower", "MultiTaskBackbone",
    "SharedBottom", "MMoE", "CGC", "PLE", "ESMM", "MultiTaskModel", "InteractionTerm", "BACKBONES", "ItemKNN", "EASE", "SequentialRules", "ItemItemCF",
]
