"""`InteractionTerm`: an explicit biased matrix-factorisation term ``<p_u, q_i> + b_u + b_i``.

An MLP over concatenated user and item embeddings approximates their dot product poorly (Rendle,
Krichene, Zhang & Anderson, "Neural Collaborative Filtering vs. Matrix Factorization Revisited",
RecSys 2020). NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017) therefore adds a
generalised-MF path beside the MLP; here the term is biased MF (Koren, Bell & Volinsky, "Matrix
Factorization Techniques for Recommender Systems", IEEE Computer 2009), added with one learned
scale per task to chosen tasks' logits (binary tasks) or outputs (regression tasks) of a
`MultiTaskModel`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .embedding import EmbeddingBagCollection, EmbeddingBagConfig, as_keyed_jagged


class InteractionTerm(nn.Module):
    """Biased MF over one user id feature and one item id feature, with its own tables.

    Each side has one table of ``dim + 1`` columns: the factors (columns ``0 .. dim-1``) and the
    bias (column ``dim``). For a row with user id ``u`` and item id ``i``::

        term = <P[u, :dim], Q[i, :dim]> + P[u, dim] + Q[i, dim]

    and task ``k`` of the model gets ``scale[k] * term`` added. Both tables are looked up by one
    `EmbeddingBagCollection` call (tables ``user`` and ``item``), trained by its fused optimizer when
    one is given, like the model's other tables. Initialisation: factors uniform in
    ``+-sqrt(1/num_embeddings)`` (TorchRec's default), biases 0, ``scale`` 1.

    The unknown id 0 (users or items never seen in training, e.g. cold users; id dropout's dropped
    rows) is scored as the mean of the known rows: ``P[0]`` is replaced by ``mean(P[1:])`` (and
    ``Q[0]`` by ``mean(Q[1:])``), a constant that takes no gradient, so row 0 itself stays 0 and
    unused. Row 0 must not be left as a row of its own: ``b_u + b_i`` is only determined up to a
    constant moved between all user and all item biases (likewise a component shared by all user
    factors), which training does not pin down; an untrained row 0 would give cold users the item
    side of that split alone (on ml100k-mtl-v1 it moved test_cold RMSE from 1.07 to 1.46), while the
    mean row carries the user side's share with it.

    Args:
        user_feature, item_feature: names of the single-valued id features (keys of the batch).
        user_rows, item_rows: rows of the two id vocabularies (``num_embeddings`` of the features).
        dim: number of factors (>= 1).
        num_tasks: number of tasks the term is added to (length of ``scale``).
        optimizer: the fused optimizer config of `EmbeddingBagCollection` (None: torch.optim).
        weight_decay: L2 penalty ``weight_decay / 2 * mean over the batch of ||P[u]||^2 + ||Q[i]||^2``
            (factors and biases of the looked-up rows, the per-example regularisation of MF trained by
            SGD, Koren et al. 2009), applied through the gradient of the lookup, so it reaches a fused
            optimizer too; training only. 0: none.

    Forward:
        sparse: `mtkernels.KeyedJaggedTensor` with both features, batch size B.
        Returns the term, float ``[B]``.

    ``state_dict`` keys: ``embeddings.embedding_bags.user.weight`` ``[user_rows, dim + 1]``,
    ``embeddings.embedding_bags.item.weight`` ``[item_rows, dim + 1]`` (and their ``.momentum``
    with the fused row-wise Adagrad), ``scale`` ``[num_tasks]``.

    Raises:
        ValueError: ``dim`` or ``num_tasks`` below 1, a negative ``weight_decay``, the same feature
            twice.
    """

    def __init__(self, user_feature: str, user_rows: int, item_feature: str, item_rows: int, dim: int,
                 num_tasks: int, optimizer: Optional[dict] = None, weight_decay: float = 0.0) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"interaction_dim must be >= 1, got {dim}")
        if int(num_tasks) < 1:
            raise ValueError(f"interaction_tasks must name at least one task, got {num_tasks}")
        if not float(weight_decay) >= 0.0:
            raise ValueError(f"interaction_weight_decay must be >= 0, got {weight_decay}")
        if user_feature == item_feature:
            raise ValueError(f"interaction_features must be two different features, got {user_feature!r} twice")
        self.dim = int(dim)
        self.weight_decay = float(weight_decay)
        self.embeddings = EmbeddingBagCollection(
            [EmbeddingBagConfig("user", user_rows, self.dim + 1, [user_feature]),
             EmbeddingBagConfig("item", item_rows, self.dim + 1, [item_feature])],
            optimizer=optimizer,
        )
        with torch.no_grad():
            for table in self.embeddings.embedding_bags.values():
                table.weight[:, self.dim] = 0.0
                table.weight[0] = 0.0  # never looked up (see above): 0 keeps checkpoints tidy
        self.scale = nn.Parameter(torch.ones(int(num_tasks)))

    def factors(self, sparse) -> Tuple[torch.Tensor, torch.Tensor]:
        """The looked-up rows ``(user [B, dim + 1], item [B, dim + 1])`` (factors, then the bias).

        In training with ``weight_decay`` > 0 their gradient carries the L2 penalty's share."""
        pooled = self._unknown_as_mean(sparse, self.embeddings(sparse))
        if self.training and self.weight_decay > 0.0 and pooled.requires_grad:
            # d/dp of weight_decay/2 * mean_b ||p_b||^2: added to the lookup's output gradient, so the
            # fused optimizer (which only sees that gradient) applies it to the touched rows.
            penalty = pooled.detach() * (self.weight_decay / max(pooled.shape[0], 1))
            pooled.register_hook(lambda grad: grad + penalty)
        return pooled[:, : self.dim + 1], pooled[:, self.dim + 1:]

    def _unknown_as_mean(self, sparse, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled [B, 2 (dim + 1)]`` with the rows of unknown ids (0) replaced by the mean known row."""
        # branch-free: the same ops whether or not the batch holds an unknown id
        kjt = as_keyed_jagged(sparse)
        unknown = [kjt[table.feature_names[0]]["values"] == 0 for table in self.embeddings.tables]
        mean = torch.cat([self.embeddings.embedding_bags[table.name].weight[1:].detach().mean(dim=0)
                          for table in self.embeddings.tables])  # [2 (dim + 1)]
        columns = torch.cat([u.unsqueeze(1).expand(-1, self.dim + 1) for u in unknown], dim=1)
        return torch.where(columns, mean.to(pooled.dtype), pooled)

    def pair_term(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The term of every (user row, item row) pair: ``[U, N]`` from ``user [U, dim + 1]`` and
        ``item [N, dim + 1]`` (rows of `factors`), for scoring a catalogue."""
        d = self.dim
        return torch.addmm(user[:, d:] + item[:, d], user[:, :d], item[:, :d].t())

    def forward(self, sparse) -> torch.Tensor:
        user, item = self.factors(sparse)
        d = self.dim
        return (user[:, :d] * item[:, :d]).sum(dim=1) + user[:, d] + item[:, d]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, weight_decay={self.weight_decay}"
