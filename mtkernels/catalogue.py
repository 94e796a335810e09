"""Scoring users against the whole item catalogue with a trained `MultiTaskModel`, factorised.

A pair's model input is ``x = [user-side columns | item-side and context columns]`` and the first
layer of every expert and every gate is linear in x, so its pre-activation splits into a user part
and an item part: ``W x + b = W x_user + (W x_item + b)``. :class:`CatalogueScorer` computes the
user part once per user (``[U, H1]``) and the item part once per item (``[N, H1]``); a pair costs
one broadcast add, then the rest of the network (deeper expert layers, gate softmax, mixture,
towers, output transforms). The widest matrix product of the model (``D x H1`` per pair, with
``D`` = all embeddings + dense columns) and the per-pair feature gathering and embedding lookups
disappear; this is the split that two-tower retrieval makes exact, and that production rankers
use to cache user-side computation (e.g. "user-side precomputation" in DLRM-style serving).

What follows the first layer runs in the native op `mtkernels.ops.catalogue_score` (CPU, float32),
which adds the two parts per block of pairs in cache and never materialises the ``[U*N, H1]``
activations; where that kernel is missing (or ``native=False``) it runs as blocked PyTorch ops.
Backbones that are not one layer of experts and gates over x (PLE with several levels, ESMM
without a bottom) fall back to the plain model forward over every pair (same outputs, slower).

A model with an interaction term (`mtkernels.nn.InteractionTerm`, biased MF) factorises exactly:
its term for U users x N items is one ``[U, d] x [d, N]`` product plus the two bias vectors, added to
the interaction tasks' logits (left untransformed by the network above) before their sigmoid.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._extension import has_kernel
from .nn.backbones import MultiTaskBackbone
from .ops.catalogue_score import CatalogueScoreParams, catalogue_score, split_first_layer
from .ops.multi_task_score import pack_multi_task_params
from .serving import pair_rows


def user_table(tables: Mapping[str, object]) -> Dict[str, object]:
    """The stored user feature table of serving tables, in the form scorers take."""
    return {"sparse": tables["user_sparse"], "multi": tables["user_multi"], "dense": tables["user_dense"]}


class CatalogueScorer:
    """Predictions of a `MultiTaskModel` for user rows x all N items: ``[U, N, T]``.

    Equal (to float32 rounding: the first layer's sum is split in two) to running the model on
    ``MultiTaskData.pair_batch`` / ``Ranker.pair_features`` of the same users.

    Args:
        model: a trained ``mtkernels.nn.MultiTaskModel`` (put in eval mode).
        tables: ``mtkernels.serving.serving_tables`` of its data (feature rows of users and items).
        users_per_block: users per block of ``[block x N]`` pairs on the PyTorch path (memory:
            block x N x H1 floats); the native op takes every requested user in one call.
        native: None (default) runs the rest of the network in the native `catalogue_score` op
            where it is built; False keeps the blocked PyTorch path (the baseline it replaced).

    Raises:
        ValueError: the model's features differ from the tables' features.
    """

    def __init__(self, model: torch.nn.Module, tables: Mapping[str, object], users_per_block: int = 16,
                 native: Optional[bool] = None) -> None:
        self.model = model.eval()
        self.native = native
        self.tables = tables
        self.users_per_block = max(1, int(users_per_block))
        self.num_items = int(tables["item_ids"].numel())
        self.tasks = list(model.tasks)
        names = [f.name for f in model.features]
        if names != list(tables["feature_names"]):
            raise ValueError(f"the model's features {names} differ from the serving tables' {tables['feature_names']}")
        self._layers = self._first_layer()
        self._item_part: Optional[torch.Tensor] = None
        self._item_factors: Optional[torch.Tensor] = None  # the interaction term's item rows [N, d + 1]
        # selected tasks -> (first-layer weight [C, D], CatalogueScoreParams, item part [N, C])
        self._op_layers: Dict[Tuple[int, ...], Tuple[torch.Tensor, CatalogueScoreParams, torch.Tensor]] = {}

    # --- layout ------------------------------------------------------------------------------
    def _first_layer(self):
        """The stacked first layers of every expert and gate, or None when not factorisable."""
        pieces = self.model.backbone._fused_scoring_params()
        if pieces is None:
            return None
        experts = pieces["experts"]
        gates = pieces["gates"]
        weights = [e[0].weight for e in experts] + [g.weight for g in gates if g is not None]
        biases = [e[0].bias for e in experts] + [g.bias for g in gates if g is not None]
        return {
            "weight": torch.cat(weights).detach(),
            "bias": torch.cat(biases).detach(),
            "experts": experts,
            "gates": gates,
            "gate_mask": pieces["gate_mask"],
        }

    def _user_columns(self) -> torch.Tensor:
        """Bool ``[D]``: the input columns that come from the user (embeddings, then dense)."""
        embeddings = self.model.embeddings
        mask = torch.zeros(embeddings.total_dim + self.model.dense_dim, dtype=torch.bool)
        for f in self.model.features:
            if f.side == "user":
                mask[embeddings.feature_slice(f.name)] = True
        user_dense = int(self.tables["user_dense"].shape[1])
        mask[embeddings.total_dim : embeddings.total_dim + user_dense] = True
        return mask

    def _inputs(self, users: Mapping[str, object], pair_users: torch.Tensor, pair_items: torch.Tensor) -> torch.Tensor:
        sparse, dense = pair_rows(self.tables, users, pair_users, pair_items)
        return self.model._inputs(sparse, dense)

    def _item_side(self) -> torch.Tensor:
        """``[N, H1]``: the item and context columns' share of the first layer, bias included."""
        if self._item_part is None:
            items = torch.arange(self.num_items)
            x = self._inputs(user_table(self.tables), torch.zeros_like(items), items)
            x = x.masked_fill(self._user_columns(), 0.0)
            self._item_part = F.linear(x, self._layers["weight"], self._layers["bias"])
        return self._item_part

    def _user_side(self, users: Mapping[str, object], rows: torch.Tensor) -> torch.Tensor:
        """``[U, H1]``: the user columns' share of the first layer."""
        x = self._inputs(users, rows, torch.zeros_like(rows))
        x = x.masked_fill(~self._user_columns(), 0.0)
        return F.linear(x, self._layers["weight"])

    # --- the native op ---------------------------------------------------------------------------
    def _use_op(self) -> bool:
        return self._layers is not None and self.native is not False and has_kernel("catalogue_score", "cpu")

    def _op_layout(self, selected: List[int]) -> Tuple[torch.Tensor, CatalogueScoreParams, torch.Tensor]:
        """The first layer in `catalogue_score`'s column layout for the tasks ``selected`` (their
        gates only), the rest of the network, and the item part ``[N, C]`` (bias included)."""
        key = tuple(selected)
        if key not in self._op_layers:
            layers = self._layers
            towers = [list(self.model.towers[t].linears) for t in selected]
            transforms = [self.model._transforms()[t] for t in selected]
            params = pack_multi_task_params(layers["experts"], [layers["gates"][t] for t in selected],
                                            layers["gate_mask"][selected], towers, transforms)
            weight, bias, rest = split_first_layer(params)
            items = torch.arange(self.num_items)
            x = self._inputs(user_table(self.tables), torch.zeros_like(items), items)
            item_part = F.linear(x.masked_fill(self._user_columns(), 0.0), weight, bias)
            self._op_layers[key] = (weight, rest, item_part)
        return self._op_layers[key]

    def _score_op(self, users: Mapping[str, object], rows: torch.Tensor, selected: List[int]) -> torch.Tensor:
        """``[U, N, len(selected)]`` through the native op: one call for all the rows."""
        weight, rest, item_part = self._op_layout(selected)
        x = self._inputs(users, rows, torch.zeros_like(rows))
        user_part = F.linear(x.masked_fill(~self._user_columns(), 0.0), weight)
        return catalogue_score(user_part, item_part, rest)

    # --- the network after the first layer (PyTorch path) ---------------------------------------
    def _rest(self, user_part: torch.Tensor, item_part: torch.Tensor, buffers: Dict[str, torch.Tensor],
              selected: List[int]) -> torch.Tensor:
        """Predictions ``[U*N, len(selected)]`` (user-major) of U users x N items for the tasks
        ``selected`` from the first layer's user part ``[U, H1]`` and item part ``[N, H1]`` (bias
        included). Unselected tasks' gates, mixtures and towers are skipped (the towers are most of
        the work left after the factorised first layer).

        Laid out expert-major (``[E, P, w]``, gates ``[G, P]``) so every elementwise step runs over
        contiguous memory and the gate softmax over a leading dimension (vectorised across pairs);
        no batch-of-P ``bmm``, which is slow at these widths. ``buffers`` are reused between blocks:
        re-allocating ~10 MB per block costs page faults that outweigh the arithmetic.
        """
        layers = self._layers
        experts, gates, mask = layers["experts"], layers["gates"], layers["gate_mask"]
        num_experts, width = len(experts), experts[0][0].out_features
        n_users, n_items = user_part.shape[0], item_part.shape[0]
        num_pairs, num_tasks = n_users * n_items, len(selected)
        expert_cols = num_experts * width
        h = buffers["experts"][:, :num_pairs]  # [E, P, w]
        for e in range(num_experts):
            cols = slice(e * width, (e + 1) * width)
            torch.add(user_part[:, None, cols], item_part[None, :, cols], out=h[e].view(n_users, n_items, width))
        h.relu_()
        if num_experts == 1:
            h = h[0]
            for linear in experts[0][1:]:
                h = F.linear(h, linear.weight, linear.bias).relu_()
            per_task = None  # every task reads the one expert h [P, H]
        else:
            for layer in range(1, len(experts[0])):
                weight = torch.stack([e[layer].weight for e in experts])
                bias = torch.stack([e[layer].bias for e in experts])
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)).relu_()
            num_logits = user_part.shape[1] - expert_cols
            logits = buffers["gates"][:num_logits, :num_pairs]  # [G, P]
            torch.add(user_part[:, expert_cols:].t()[:, :, None], item_part[:, expert_cols:].t()[:, None, :],
                      out=logits.view(num_logits, n_users, n_items))
            per_task = buffers["tasks"][:num_tasks, :num_pairs, : h.shape[-1]]
            offsets, offset = [], 0
            for t, gate in enumerate(gates):
                offsets.append(offset)
                offset += 0 if gate is None else int(mask[t].sum())
            for j, t in enumerate(selected):
                allowed = mask[t].nonzero().flatten().tolist()
                if gates[t] is None:  # one allowed expert: weight 1
                    per_task[j].copy_(h[allowed[0]])
                    continue
                g = torch.softmax(logits[offsets[t] : offsets[t] + len(allowed)], dim=0)  # [n_t, P]
                torch.mul(h[allowed[0]], g[0, :, None], out=per_task[j])
                for i, e in enumerate(allowed[1:], start=1):
                    per_task[j].addcmul_(h[e], g[i, :, None])
        towers = [list(self.model.towers[t].linears) for t in selected]
        out = user_part.new_empty(num_pairs, num_tasks)
        if len({tuple(tuple(l.weight.shape) for l in tower) for tower in towers}) == 1:
            depth = len(towers[0])
            if per_task is None:  # first tower layers of all tasks as one product over the shared h
                weight = torch.cat([tower[0].weight for tower in towers])
                bias = torch.cat([tower[0].bias for tower in towers])
                z = F.linear(h, weight, bias).view(num_pairs, num_tasks, -1).transpose(0, 1)
                first = 1
            else:
                z, first = per_task, 0
            for i in range(first, depth):
                if i > 0:
                    z = z.relu_() if z.is_contiguous() else torch.relu(z)
                weight = torch.stack([tower[i].weight for tower in towers])
                bias = torch.stack([tower[i].bias for tower in towers])
                z = torch.baddbmm(bias.unsqueeze(1), z, weight.transpose(1, 2))  # [T, P, O]
            out.copy_(z.squeeze(-1).t())
        else:
            for t, tower in enumerate(towers):
                z = h if per_task is None else per_task[t]
                for i, linear in enumerate(tower):
                    if i > 0:
                        z = torch.relu(z)
                    z = F.linear(z, linear.weight, linear.bias)
                out[:, t] = z.squeeze(-1)
        interaction = set(getattr(self.model, "interaction_columns", []))
        for j, t in enumerate(selected):
            if self.tasks[t].kind == "binary" and t not in interaction:
                out[:, j].sigmoid_()
        return out

    def _add_interaction(self, out: torch.Tensor, users: Mapping[str, object], rows: torch.Tensor,
                         selected: List[int]) -> torch.Tensor:
        """``out [U, N, len(selected)]`` (interaction tasks' columns raw) with the model's
        interaction term of the U user rows x N items added to those columns, then their sigmoid."""
        columns = getattr(self.model, "interaction_columns", [])
        if not any(t in columns for t in selected):
            return out
        interaction = self.model.interaction
        if self._item_factors is None:
            items = torch.arange(self.num_items)
            sparse, _ = pair_rows(self.tables, user_table(self.tables), torch.zeros_like(items), items)
            self._item_factors = interaction.factors(sparse)[1]
        sparse, _ = pair_rows(self.tables, users, rows, torch.zeros_like(rows))
        term = interaction.pair_term(interaction.factors(sparse)[0], self._item_factors)  # [U, N]
        for j, t in enumerate(selected):
            if t in columns:
                logits = out[:, :, j] + interaction.scale[columns.index(t)] * term
                out[:, :, j] = torch.sigmoid(logits) if self.tasks[t].kind == "binary" else logits
        return out

    def _buffers(self, num_pairs: int) -> Dict[str, torch.Tensor]:
        layers = self._layers
        experts = layers["experts"]
        num_experts, width = len(experts), experts[0][0].out_features
        num_logits = layers["weight"].shape[0] - num_experts * width
        tasks = len(layers["gates"])
        return {
            "experts": torch.empty(num_experts, num_pairs, width),
            "gates": torch.empty(max(num_logits, 1), num_pairs),
            "tasks": torch.empty(tasks, num_pairs, experts[0][-1].out_features) if num_experts > 1 else None,
        }

    # --- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, users: Mapping[str, object], rows: torch.Tensor, tasks: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Predictions ``[U, N, len(tasks)]`` for user rows ``rows`` (int64 ``[U]``) of ``users``
        (the serving user table, possibly with appended rows) against every item: probabilities for
        binary tasks, raw values for regression tasks; ``tasks`` names the columns (default all, in
        model order).

        Raises:
            ValueError: an unknown task name.
        """
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        names = [t.name for t in self.tasks]
        tasks = list(names if tasks is None else tasks)
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the model's tasks are {names}")
        wanted = [names.index(t) for t in tasks]
        # a backbone that maps tower outputs across tasks (ESMM: pCTCVR = pCTR x pCVR) needs them all
        custom_outputs = type(self.model.backbone).outputs is not MultiTaskBackbone.outputs
        selected = list(range(len(names))) if custom_outputs or self._layers is None else wanted
        n_users, n_items, n_tasks = rows.numel(), self.num_items, len(selected)
        if self._use_op():
            out = self._add_interaction(self._score_op(users, rows, selected), users, rows, selected)
            if custom_outputs:
                out = self.model.backbone.outputs(out.view(n_users * n_items, n_tasks)).view(n_users, n_items, n_tasks)
            return out if selected == wanted else out[:, :, wanted]
        out = torch.empty(n_users, n_items, n_tasks)
        items = torch.arange(n_items)
        if self._layers is not None:
            item_part = self._item_side()
            buffers = self._buffers(min(n_users, self.users_per_block) * n_items)
        for start in range(0, n_users, self.users_per_block):
            block = rows[start : start + self.users_per_block]
            if self._layers is None:
                pred = self.model(*pair_rows(self.tables, users, block.repeat_interleave(n_items), items.repeat(block.numel())))
            else:
                pred = self._rest(self._user_side(users, block), item_part, buffers, selected)
                pred = self._add_interaction(pred.view(block.numel(), n_items, n_tasks), users, block, selected)
                if custom_outputs:
                    pred = self.model.backbone.outputs(pred.view(block.numel() * n_items, n_tasks))
            out[start : start + block.numel()] = pred.view(block.numel(), n_items, n_tasks)
        return out if selected == wanted else out[:, :, wanted]

    @torch.no_grad()
    def score_pairs(self, users: Mapping[str, object], pair_users: torch.Tensor, pair_items: torch.Tensor) -> torch.Tensor:
        """Predictions ``[P, T]`` of the pairs ``(pair_users[i], pair_items[i])`` (plain forward)."""
        return self.model(*pair_rows(self.tables, users, pair_users, pair_items))

