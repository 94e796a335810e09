"""`EmbeddingBagCollection`: all sparse features of a batch pooled by the `embedding_bags` op.

Follows TorchRec's ``EmbeddingBagCollection`` (tables described by small configs, a
``KeyedJaggedTensor`` in, one ``[B, total_dim]`` tensor out, ``state_dict`` keys
``embedding_bags.<table name>.weight``), with the lookup of every feature done by one call of
`mtkernels.ops.embedding_bags` (FBGEMM's table-batched embedding layout) instead of one
``nn.EmbeddingBag`` per table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..jagged import KeyedJaggedTensor

POOLINGS = ("sum", "mean")
OPTIMIZER_KINDS = ("rowwise_adagrad", "sgd")


@dataclass
class EmbeddingBagConfig:
    """One embedding table and the features that look it up.

    Args:
        name: table name; the ``state_dict`` key is ``embedding_bags.<name>.weight``.
        num_embeddings: rows of the table (ids ``0 .. num_embeddings-1``).
        embedding_dim: columns of the table (the width of each of its features in the output).
        feature_names: the features (keys of the ``KeyedJaggedTensor``) pooled from this table;
            several features may share one table.
        pooling: ``"sum"`` or ``"mean"`` over the ids of one bag (an empty bag pools to zeros).

    Raises:
        ValueError: an empty name or feature list, a non-positive size, an unknown pooling.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: List[str] = field(default_factory=list)
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ValueError(f"table name must be a non-empty string without '.', got {self.name!r}")
        if int(self.num_embeddings) < 1:
            raise ValueError(f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")
        if int(self.embedding_dim) < 1:
            raise ValueError(f"table {self.name!r}: embedding_dim must be >= 1, got {self.embedding_dim}")
        self.num_embeddings = int(self.num_embeddings)
        self.embedding_dim = int(self.embedding_dim)
        self.feature_names = list(self.feature_names)
        if not self.feature_names:
            raise ValueError(f"table {self.name!r}: feature_names must name at least one feature")
        if self.pooling not in POOLINGS:
            raise ValueError(f"table {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")


class EmbeddingTable(nn.Module):
    """One table's storage: ``weight [num_embeddings, embedding_dim]`` and, with the fused row-wise
    Adagrad optimizer, its per-row accumulator buffer ``momentum [num_embeddings]`` (float32)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        # TorchRec's default initialisation: uniform in +-sqrt(1/num_embeddings).
        bound = math.sqrt(1.0 / num_embeddings)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


def as_keyed_jagged(features) -> KeyedJaggedTensor:
    """A `mtkernels.KeyedJaggedTensor`, converting a torchrec one (duck-typed: keys/values/lengths).

    Raises:
        TypeError: anything else.
    """
    if isinstance(features, KeyedJaggedTensor):
        return features
    if all(hasattr(features, a) for a in ("keys", "values", "lengths", "offsets", "weights_or_none")):
        return KeyedJaggedTensor.from_torchrec(features)
    raise TypeError(
        f"features must be a mtkernels.KeyedJaggedTensor or a torchrec KeyedJaggedTensor, "
        f"got {type(features).__name__}"
    )


class EmbeddingBagCollection(nn.Module):
    """Pooled embeddings of many sparse features through one fused `embedding_bags` call.

    Args:
        tables: the tables (`EmbeddingBagConfig`); table and feature names must be unique.
        optimizer: ``None`` — the tables are ``nn.Parameter`` s trained by ``torch.optim`` (dense
            gradients). Or ``{"kind": "rowwise_adagrad" | "sgd", "lr": float, "eps": float}``
            (optionally ``"initial_accumulator_value"``): the update is applied to the touched rows
            inside the backward by `mtkernels.ops.FusedEmbeddingOptimizer` (FBGEMM's
            EXACT_ROWWISE_ADAGRAD or SGD); the tables then do not require grad, never hold a
            ``.grad``, and must not be given to a ``torch.optim`` optimizer.
        table_lr_scale: optional ``{table name: scale >= 0}`` (others 1). With a fused optimizer,
            tables of one scale share one `FusedEmbeddingOptimizer` whose lr is ``lr * scale``;
            scale 0 freezes a table outright: it is looked up by its own op call without any
            optimizer, takes no gradient and holds no optimizer state (no ``momentum`` buffer).
            Without a fused optimizer, a frozen table does not require grad and `lr_scale` gives
            a ``torch.optim`` set-up the multiplier of the others (see `set_table_lr_scale`).

    Forward:
        features: `mtkernels.KeyedJaggedTensor` (or a torchrec one) holding at least every feature
            of the tables (extra keys are ignored), batch size B, int32/int64 ids; its optional
            ``weights`` are per-sample weights (tables with ``"sum"`` pooling only).
        Returns ``[B, total_dim]`` in the tables' dtype (float32 by default): the pooled features
        concatenated in `feature_names` order (tables in config order, features in each table's
        order), feature ``f`` in columns `feature_slice(f)`.

    ``state_dict`` keys (a checkpoint format; stable): ``embedding_bags.<table name>.weight`` per
    table, plus ``embedding_bags.<table name>.momentum`` (float32 ``[num_embeddings]``, the
    row-wise Adagrad accumulators) with the fused row-wise Adagrad optimizer for every table that
    ``table_lr_scale`` does not freeze, so training resumes exactly.

    Raises:
        ValueError: duplicate table or feature names, a bad optimizer config (constructor); a missing
            feature, different batch sizes, weights with a ``"mean"`` table (forward).
        TypeError: features of another type.
        IndexError: an id outside its table (from the op, naming the feature and position).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], optimizer: Optional[dict] = None,
                 table_lr_scale: Optional[Dict[str, float]] = None) -> None:
        super().__init__()
        self.tables = list(tables)
        if not self.tables:
            raise ValueError("tables must hold at least one EmbeddingBagConfig")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        self.feature_names: List[str] = [f for t in self.tables for f in t.feature_names]
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature names must be unique across tables, got {self.feature_names}")
        self.embedding_bags = nn.ModuleDict()
        for t in self.tables:
            # Straight into _modules: add_module refuses names that are attributes of ModuleDict
            # ("items", "keys", "values", ...), natural table names here. Read with [name].
            self.embedding_bags._modules[t.name] = EmbeddingTable(t.num_embeddings, t.embedding_dim)

        # Column layout of the output, feature by feature.
        self._slices: Dict[str, slice] = {}
        start = 0
        for t in self.tables:
            for f in t.feature_names:
                self._slices[f] = slice(start, start + t.embedding_dim)
                start += t.embedding_dim
        self.total_dim = start

        self.optimizer_config = None if optimizer is None else self._check_optimizer(optimizer)
        self._fused_optimizers: List[object] = []
        self._bound_groups: List[dict] = []
        self._frozen = False
        self._lr_scale: Dict[str, float] = {t.name: 1.0 for t in self.tables}
        if self.optimizer_config is not None:
            for table in self.embedding_bags.values():
                table.weight.requires_grad_(False)
        self.set_table_lr_scale(table_lr_scale or {})

    def _build_groups(self) -> None:
        """One op call per (pooling mode, learning-rate scale) present: the op takes one pooling
        mode and one fused optimizer per call (one call in the usual case)."""
        self._groups = []
        for pooling in POOLINGS:
            scales = sorted({self._lr_scale[t.name] for t in self.tables if t.pooling == pooling}, reverse=True)
            for scale in scales:
                group_tables = [t for t in self.tables if t.pooling == pooling and self._lr_scale[t.name] == scale]
                features = [f for t in group_tables for f in t.feature_names]
                feature_table = [i for i, t in enumerate(group_tables) for _ in t.feature_names]
                self._groups.append(
                    {"pooling": pooling, "lr_scale": scale, "tables": [t.name for t in group_tables],
                     "features": features, "feature_table": feature_table}
                )
        column_order = [c for g in self._groups for f in g["features"] for c in range(
            self._slices[f].start, self._slices[f].stop)]
        # position in the concatenated group outputs of each output column
        inverse = [0] * self.total_dim
        for position, column in enumerate(column_order):
            inverse[column] = position
        identity = inverse == list(range(self.total_dim))
        self._column_permutation = None if identity else torch.tensor(inverse)

    # --- per-table training -----------------------------------------------------------------
    def set_table_lr_scale(self, scales: Dict[str, float]) -> "EmbeddingBagCollection":
        """Set the learning-rate multiplier of some tables (``{table name: scale >= 0}``; the
        others keep theirs); 0 freezes a table (no gradient, no optimizer state).

        With a fused optimizer the op calls are regrouped and the fused optimizers rebuilt: each
        trained table keeps its Adagrad accumulator, a frozen table's is dropped, and a table
        unfrozen again starts from a zero accumulator. Without one, ``requires_grad`` follows
        ``scale > 0``; `lr_scale` gives the multiplier for a ``torch.optim`` parameter group.
        Returns ``self``.

        Raises:
            ValueError: an unknown table or a negative scale.
        """
        for name, scale in dict(scales).items():
            if name not in self._lr_scale:
                raise ValueError(f"table_lr_scale names an unknown table {name!r}; tables are {list(self._lr_scale)}")
            if not float(scale) >= 0.0:
                raise ValueError(f"table_lr_scale[{name!r}] must be >= 0, got {scale}")
            self._lr_scale[name] = float(scale)
        self._build_groups()
        if self.optimizer_config is None:
            for name, table in self.embedding_bags.items():
                table.weight.requires_grad_(not self._frozen and self._lr_scale[name] > 0)
        else:
            for name, table in self.embedding_bags.items():
                if self._lr_scale[name] == 0.0 and "momentum" in table._buffers:
                    del table._buffers["momentum"]
            self._bind_fused_optimizers()
        return self

    def lr_scale(self, table: str) -> float:
        """The learning-rate multiplier of ``table`` (0: frozen).

        Raises:
            KeyError: an unknown table.
        """
        if table not in self._lr_scale:
            raise KeyError(f"unknown table {table!r}; tables are {list(self._lr_scale)}")
        return self._lr_scale[table]

    @property
    def frozen_tables(self) -> List[str]:
        """Names of the tables that are not trained (scale 0, or all of them after `freeze`)."""
        return [t.name for t in self.tables if self._frozen or self._lr_scale[t.name] == 0.0]

    # --- fused optimizer --------------------------------------------------------------------
    @staticmethod
    def _check_optimizer(optimizer: dict) -> dict:
        if not isinstance(optimizer, dict):
            raise ValueError(f"optimizer must be None or a dict, got {type(optimizer).__name__}")
        config = dict(optimizer)
        kind = config.get("kind", "rowwise_adagrad")
        if kind not in OPTIMIZER_KINDS:
            raise ValueError(f"optimizer kind must be one of {OPTIMIZER_KINDS}, got {kind!r}")
        config["kind"] = kind
        unknown = set(config) - {"kind", "lr", "eps", "initial_accumulator_value"}
        if unknown:
            raise ValueError(f"optimizer has unknown keys {sorted(unknown)}; expected kind, lr, eps, "
                             "initial_accumulator_value")
        if "lr" in config and not float(config["lr"]) > 0:
            raise ValueError(f"optimizer lr must be > 0, got {config['lr']}")
        return config

    def _bind_fused_optimizers(self) -> None:
        """(Re)build one FusedEmbeddingOptimizer per trained op call (lr = base lr x the group's
        scale) over the current table tensors, and expose its accumulators as the tables'
        ``momentum`` buffers (their values carried over, so moving the module to another device
        keeps the optimizer state). Frozen groups get no optimizer."""
        config = dict(self.optimizer_config)
        bound = [(g, o) for g, o in zip(self._bound_groups, self._fused_optimizers) if o is not None]
        if bound:  # keep a learning rate changed since (a schedule)
            config["lr"] = bound[0][1].lr / bound[0][0]["lr_scale"]
        self._fused_optimizers = []
        for group in self._groups:
            if group["lr_scale"] == 0.0:
                self._fused_optimizers.append(None)
                continue
            modules = [self.embedding_bags[name] for name in group["tables"]]
            group_config = dict(config)
            if "lr" in group_config:
                group_config["lr"] = float(group_config["lr"]) * group["lr_scale"]
            optimizer = ops.FusedEmbeddingOptimizer([m.weight for m in modules], **group_config)
            if config["kind"] == "rowwise_adagrad":
                for module, accumulator in zip(modules, optimizer.accumulators):
                    previous = module._buffers.get("momentum")
                    if previous is not None:
                        accumulator.copy_(previous)
                    module.register_buffer("momentum", accumulator)
            self._fused_optimizers.append(optimizer)
        self._bound_groups = list(self._groups)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() replace the buffer tensors: rebind the optimizer to the new ones.
        result = super()._apply(fn, recurse)
        if self.optimizer_config is not None:
            self._bind_fused_optimizers()
        return result

    def freeze(self, frozen: bool = True) -> "EmbeddingBagCollection":
        """Stop (or, with ``frozen=False``, resume) training the tables, e.g. to transfer them.

        Without a fused optimizer this sets ``requires_grad`` of the tables; with one it turns the
        update inside the backward off (the tables never require grad there, so
        ``requires_grad_(False)`` alone would not stop it). Returns ``self``.
        """
        self._frozen = bool(frozen)
        if self.optimizer_config is None:
            for name, table in self.embedding_bags.items():
                table.weight.requires_grad_(not self._frozen and self._lr_scale[name] > 0)
        return self

    @property
    def frozen(self) -> bool:
        """True after `freeze` (the tables are not trained)."""
        return self._frozen

    @property
    def fused_optimizers(self) -> List[object]:
        """The `mtkernels.ops.FusedEmbeddingOptimizer` s (one per trained op call; empty without a
        fused optimizer, none for frozen tables); set ``.lr`` on each for a learning-rate schedule
        (each one's lr is the base lr times its tables' `lr_scale`)."""
        return [o for o in self._fused_optimizers if o is not None]

    # --- layout -----------------------------------------------------------------------------
    def feature_slice(self, name: str) -> slice:
        """The columns of feature ``name`` in the forward output.

        Raises:
            KeyError: an unknown feature.
        """
        if name not in self._slices:
            raise KeyError(f"unknown feature {name!r}; features are {self.feature_names}")
        return self._slices[name]

    def split(self, pooled: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{feature name: pooled[:, feature_slice(name)]}`` (views) for an output ``[B, total_dim]``."""
        if pooled.dim() != 2 or pooled.shape[1] != self.total_dim:
            raise ValueError(f"pooled must be [B, {self.total_dim}], got {tuple(pooled.shape)}")
        return {f: pooled[:, s] for f, s in self._slices.items()}

    # --- forward ----------------------------------------------------------------------------
    @staticmethod
    def _select(kjt: KeyedJaggedTensor, names: List[str]):
        """values, offsets and weights of the features ``names`` (in that order), feature-major."""
        keys = kjt.keys()
        if keys == names:
            return kjt.values(), kjt.offsets(), kjt.weights_or_none()
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(f"features {missing} are missing from the KeyedJaggedTensor (keys {keys})")
        batch = kjt.stride()
        offsets, lengths, values, weights = kjt.offsets(), kjt.lengths(), kjt.values(), kjt.weights_or_none()
        positions = [keys.index(n) for n in names]
        if positions == list(range(positions[0], positions[0] + len(positions))):
            # a run of consecutive keys (e.g. one pooling group of the batch): views, no copy
            first, last = positions[0] * batch, (positions[-1] + 1) * batch
            start, end = offsets[[first, last]].tolist()
            return (values[start:end], offsets[first:last + 1] - start,
                    None if weights is None else weights[start:end])
        bounds = offsets[[p * batch for p in positions] + [(p + 1) * batch for p in positions]].tolist()
        starts, ends = bounds[: len(positions)], bounds[len(positions):]
        new_values = torch.cat([values[s:e] for s, e in zip(starts, ends)])
        new_weights = None if weights is None else torch.cat([weights[s:e] for s, e in zip(starts, ends)])
        new_lengths = lengths.view(len(keys), batch)[positions].reshape(-1)
        new_offsets = torch.zeros(new_lengths.numel() + 1, dtype=offsets.dtype, device=offsets.device)
        torch.cumsum(new_lengths, 0, out=new_offsets[1:])
        return new_values, new_offsets, new_weights

    def forward(self, features) -> torch.Tensor:
        parts = self.pooled_parts(features)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def pooled_parts(self, features) -> List[torch.Tensor]:
        """The pooled output as a list of ``[B, D_i]`` tensors whose concatenation along dim 1 is
        `forward`'s ``[B, total_dim]`` (one per pooling group in column order; one tensor when the
        groups' columns are permuted). A caller that concatenates more columns (the model's dense
        features) makes one copy instead of two, and its backward hands each lookup its gradient
        slice directly."""
        kjt = as_keyed_jagged(features)
        pooled = []
        for i, group in enumerate(self._groups):
            values, offsets, weights = self._select(kjt, group["features"])
            if weights is not None and group["pooling"] != "sum":
                raise ValueError(
                    f"per-sample weights (KeyedJaggedTensor weights) need pooling='sum'; tables "
                    f"{group['tables']} use {group['pooling']!r}"
                )
            tables = [self.embedding_bags[name].weight for name in group["tables"]]
            kwargs = {}
            if self._fused_optimizers and not self._frozen and self._fused_optimizers[i] is not None:
                kwargs["fused_optimizer"] = self._fused_optimizers[i]
            pooled.append(
                ops.embedding_bags(tables, values, offsets, group["feature_table"], group["pooling"],
                                   weights, **kwargs)
            )
        if self._column_permutation is None:
            return pooled
        permutation = self._column_permutation.to(pooled[0].device)
        return [torch.cat(pooled, dim=1).index_select(1, permutation)]

    def extra_repr(self) -> str:
        tables = ", ".join(f"{t.name}({t.num_embeddings}x{t.embedding_dim}, {t.pooling}: "
                           f"{'/'.join(t.feature_names)})" for t in self.tables)
        fused = "" if self.optimizer_config is None else f", fused optimizer {self.optimizer_config}"
        return f"tables=[{tables}]{fused}"
