"""`MultiTaskModel`: sparse features (EmbeddingBagCollection) + dense features -> backbone -> one
tower per task -> ``[B, T]`` predictions.

In ``eval()`` under ``torch.no_grad()`` the experts, gates and towers run as one fused
`mtkernels.ops.multi_task_score` call (SharedBottom, MMoE, single-level PLE, ESMM with a bottom);
training and every other case run the same network as PyTorch layers and two training ops: the
experts' first layers and the gates as one GEMM, ReLU + dropout as `mtkernels.ops.relu_dropout`,
the gates' softmax and mixture as `mtkernels.ops.gated_mixture`, the towers of all tasks batched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..ops.multi_task_score import weights_key
from .backbones import ESMM, MMoE, PLE, TASK_KINDS, MultiTaskBackbone, SharedBottom
from .embedding import EmbeddingBagCollection, EmbeddingBagConfig
from .interaction import InteractionTerm
from .towers import TaskTower, tower_outputs

BACKBONES = ("shared_bottom", "mmoe", "ple", "esmm")
_FEATURE_FIELDS = ("name", "num_embeddings", "multi_valued", "side")
_TASK_FIELDS = ("name", "kind")


def _spec(obj, kind: str):
    """A FeatureSpec/TaskSpec from a spec or a plain dict (as stored in ``model.config``)."""
    if not isinstance(obj, Mapping):
        return obj
    # imported here: mtkernels.data pulls in pandas, which a model that is given specs never needs
    from ..data import types
    return getattr(types, kind)(**obj)


def _spec_dict(obj, fields: Sequence[str]) -> dict:
    if dataclasses.is_dataclass(obj):
        record = dataclasses.asdict(obj)
    elif isinstance(obj, Mapping):
        record = dict(obj)
    else:
        record = {f: getattr(obj, f) for f in fields if hasattr(obj, f)}
    return {f: record[f] for f in fields if f in record}


class MultiTaskModel(nn.Module):
    """A multi-task recommender: ``EmbeddingBagCollection`` over the sparse features, concatenated
    with the dense features, a multi-task backbone and one `TaskTower` per task.

    Args:
        features: FeatureSpec list (``name, num_embeddings, multi_valued, side``; from
            `mtkernels.data`, or dicts with those keys): one table per feature, named like it,
            ``embedding_dim`` wide; single-valued features pool by sum (one id), multi-valued by mean.
        dense_dim: number of dense float features (0 for none).
        tasks: TaskSpec list (``name, kind`` with kind ``"binary"`` or ``"regression"``).
        backbone: ``"shared_bottom"`` (`SharedBottom`), ``"mmoe"`` (`MMoE`), ``"ple"`` (`PLE`) or
            ``"esmm"`` (`ESMM`; ``backbone_kwargs["ctr_task"]`` may name the CTR task).
        embedding_dim: width of every table.
        backbone_kwargs: extra constructor arguments of the backbone (e.g. ``num_experts``,
            ``expert_hidden``, ``num_levels``, ``num_shared_experts``, ``num_task_experts``, ``hidden``).
        tower_hidden: hidden widths of each tower.
        dropout: dropout of experts and towers (training only).
        embedding_optimizer: ``None`` or the fused optimizer of `EmbeddingBagCollection`
            (``{"kind": "rowwise_adagrad" | "sgd", "lr": ..., "eps": ...}``).
        use_fused_scoring: run ``eval()`` + ``no_grad`` forwards through `multi_task_score`.
        lr_scales: optional ``{parameter-name prefix: scale >= 0}``: learning-rate multipliers of
            parts of the model (e.g. ``{"embeddings": 0.0, "backbone.experts": 0.1}``; prefixes
            match whole dot-separated components of ``named_parameters`` names, the longest
            match wins, unmatched parameters have 1). Scale 0 freezes: the parameters do not
            require grad and get no optimizer state (frozen tables: no fused optimizer, no
            ``momentum`` buffer). `mtkernels.training.fit` gives Adam one parameter group per
            scale (lr x scale); a table's fused optimizer runs at its lr x scale. Set by
            `mtkernels.transfer.transfer`; kept in `config` so a checkpoint rebuilds the same.
        shared_tables: optional ``{feature: owner feature}``: the feature looks up the owner's
            table instead of a table of its own (TorchRec's several features per
            ``EmbeddingBagConfig``), e.g. ``{"history": "item_id"}`` pools the user-history bag
            from the item embeddings, as SVD++'s implicit factors would if tied to the item
            factors. The owner's table then pools by mean (one id: the same value) and gets no
            ``history`` table; both need the same ``num_embeddings``. Omitted from `config`
            when None, so older checkpoints rebuild unchanged.
        interaction_tasks: optional task names that get an explicit biased-MF term
            ``scale_t * (<p_u, q_i> + b_u + b_i)`` (`InteractionTerm`, NeuMF's GMF path beside the MLP:
            He et al., WWW 2017; biased MF: Koren et al. 2009) added to their logit (binary tasks)
            or output (regression tasks), from tables of its own. None or empty: no term (and no
            ``interaction_*`` keys in `config`, so older checkpoints rebuild unchanged).
        interaction_dim: its number of factors (>= 1; needed with ``interaction_tasks``).
        interaction_features: the (user, item) single-valued id features it looks up.
        interaction_optimizer: the fused optimizer config of its tables (same form as
            ``embedding_optimizer``); None: that of the other tables.
        interaction_weight_decay: L2 penalty of its looked-up rows (see `InteractionTerm`).

    Forward:
        sparse: `mtkernels.KeyedJaggedTensor` (or torchrec's) with every feature, batch size B.
        dense: float ``[B, dense_dim]`` (may be ``None`` when ``dense_dim == 0``).
        Returns ``[B, T]`` float: probabilities (sigmoid) for binary tasks (ESMM: pCTR and pCTCVR),
        raw values for regression tasks, columns in task order.

    ``state_dict`` keys: ``embeddings.embedding_bags.<feature>.weight`` (and ``.momentum`` with the
    fused row-wise Adagrad), ``backbone.*`` (see each backbone), ``towers.<t>.linears.<i>.*``, and
    with an interaction term ``interaction.embeddings.embedding_bags.{user,item}.weight`` (``.momentum``)
    and ``interaction.scale`` ``[len(interaction_tasks)]`` (see `InteractionTerm`).
    `config` is a JSON-serialisable dict that `from_config` rebuilds the model from.

    The fused ``eval()`` path (``use_fused_scoring``) stays on with an interaction term: the packed
    `multi_task_score` leaves the interaction tasks' logits untransformed, the term is added after
    it, then the sigmoid, so both paths give the same outputs.

    Raises:
        ValueError: no features, duplicate feature names, unknown task kind or backbone, bad sizes,
            ``interaction_tasks`` naming unknown tasks or without ``interaction_dim``, interaction
            features that are unknown or multi-valued (constructor); dense of the wrong shape or
            batch size, or not finite (forward).
    """

    def __init__(self, features: Sequence, dense_dim: int, tasks: Sequence, backbone: str = "mmoe",
                 embedding_dim: int = 16, backbone_kwargs: Optional[dict] = None,
                 tower_hidden: Sequence[int] = (32,), dropout: float = 0.0,
                 embedding_optimizer: Optional[dict] = None, use_fused_scoring: bool = True,
                 lr_scales: Optional[Mapping[str, float]] = None,
                 shared_tables: Optional[Mapping[str, str]] = None,
                 interaction_tasks: Optional[Sequence[str]] = None, interaction_dim: Optional[int] = None,
                 interaction_features: Sequence[str] = ("user_id", "item_id"),
                 interaction_optimizer: Optional[dict] = None, interaction_weight_decay: float = 0.0) -> None:
        super().__init__()
        self.features = [_spec(f, "FeatureSpec") for f in features]
        self._tasks = [_spec(t, "TaskSpec") for t in tasks]
        if not self.features:
            raise ValueError("features must hold at least one sparse feature")
        if not self._tasks:
            raise ValueError("tasks must hold at least one task")
        kinds = [t.kind for t in self._tasks]
        if any(k not in TASK_KINDS for k in kinds):
            raise ValueError(f"task kinds must be in {TASK_KINDS}, got {kinds}")
        task_names = [t.name for t in self._tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be unique, got {task_names}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if int(dense_dim) < 0:
            raise ValueError(f"dense_dim must be >= 0, got {dense_dim}")
        self.dense_dim = int(dense_dim)
        backbone_kwargs = dict(backbone_kwargs or {})
        self._config = {
            "features": [_spec_dict(f, _FEATURE_FIELDS) for f in self.features],
            "dense_dim": self.dense_dim,
            "tasks": [_spec_dict(t, _TASK_FIELDS) for t in self._tasks],
            "backbone": backbone,
            "embedding_dim": int(embedding_dim),
            "backbone_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone_kwargs.items()},
            "tower_hidden": [int(h) for h in tower_hidden],
            "dropout": float(dropout),
            "embedding_optimizer": None if embedding_optimizer is None else dict(embedding_optimizer),
            "use_fused_scoring": bool(use_fused_scoring),
        }

        shared = dict(shared_tables or {})
        specs = {f.name: f for f in self.features}
        for feature, owner in shared.items():
            if feature not in specs or owner not in specs or owner in shared or feature == owner:
                raise ValueError(f"shared_tables: {feature!r} -> {owner!r} must map a feature to another feature "
                                 f"that owns its table; features are {list(specs)}")
            if specs[feature].num_embeddings != specs[owner].num_embeddings:
                raise ValueError(f"shared_tables: {feature!r} has {specs[feature].num_embeddings} ids, "
                                 f"{owner!r} {specs[owner].num_embeddings}")
        if shared:
            self._config["shared_tables"] = dict(shared)
        tables = []
        for f in self.features:
            if f.name in shared:
                continue
            names = [f.name] + [g for g, owner in shared.items() if owner == f.name]
            multi = any(getattr(specs[n], "multi_valued", False) for n in names)
            tables.append(EmbeddingBagConfig(f.name, f.num_embeddings, embedding_dim, names, "mean" if multi else "sum"))
        self.embeddings = EmbeddingBagCollection(tables, optimizer=embedding_optimizer)
        input_dim = self.embeddings.total_dim + self.dense_dim
        num_tasks = len(self._tasks)
        if backbone == "shared_bottom":
            self.backbone: MultiTaskBackbone = SharedBottom(input_dim, num_tasks, dropout=dropout, **backbone_kwargs)
        elif backbone == "mmoe":
            self.backbone = MMoE(input_dim, num_tasks, dropout=dropout, **backbone_kwargs)
        elif backbone == "ple":
            self.backbone = PLE(input_dim, num_tasks, dropout=dropout, **backbone_kwargs)
        else:
            ctr_task = backbone_kwargs.pop("ctr_task", 0)
            if isinstance(ctr_task, str):
                if ctr_task not in task_names:
                    raise ValueError(f"ctr_task {ctr_task!r} is not a task; tasks are {task_names}")
                ctr_task = task_names.index(ctr_task)
            self.backbone = ESMM(input_dim, kinds, ctr_task=ctr_task, dropout=dropout, **backbone_kwargs)
        self.towers = nn.ModuleList(TaskTower(d, tower_hidden, dropout) for d in self.backbone.task_dims)
        self.interaction: Optional[InteractionTerm] = None
        self._interaction_columns: List[int] = []
        if interaction_tasks:
            self._build_interaction(list(interaction_tasks), interaction_dim, list(interaction_features),
                                    interaction_optimizer, interaction_weight_decay, embedding_optimizer)
        self.use_fused_scoring = bool(use_fused_scoring)
        self._packed = None  # (key, params) cache of the fused scoring parameters
        self._lr_scales: Dict[str, float] = {}
        if lr_scales:
            self.set_lr_scales(lr_scales)

    def _build_interaction(self, tasks: List[str], dim, features: List[str], optimizer: Optional[dict],
                           weight_decay: float, embedding_optimizer: Optional[dict]) -> None:
        names = [t.name for t in self._tasks]
        unknown = [t for t in tasks if t not in names]
        if unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"interaction_tasks must name distinct tasks of the model {names}, got {tasks}")
        if dim is None:
            raise ValueError("interaction_dim must be given with interaction_tasks")
        specs = {f.name: f for f in self.features}
        if len(features) != 2 or any(f not in specs or getattr(specs[f], "multi_valued", False) for f in features):
            raise ValueError(f"interaction_features must name two single-valued features (user, item) of {list(specs)}, "
                             f"got {features}")
        optimizer = embedding_optimizer if optimizer is None else optimizer
        user, item = (specs[f] for f in features)
        self.interaction = InteractionTerm(user.name, user.num_embeddings, item.name, item.num_embeddings, int(dim),
                                           len(tasks), None if optimizer is None else dict(optimizer), weight_decay)
        self._interaction_columns = [names.index(t) for t in tasks]
        self._config.update({
            "interaction_tasks": list(tasks), "interaction_dim": int(dim), "interaction_features": list(features),
            "interaction_optimizer": None if optimizer is None else dict(optimizer),
            "interaction_weight_decay": float(weight_decay),
        })

    # --- learning-rate scales and freezing ---------------------------------------------------
    def lr_scale_of(self, name: str) -> float:
        """The learning-rate multiplier of parameter ``name`` (a ``named_parameters`` name): that of
        the longest `lr_scales` prefix matching whole components of it, else 1."""
        best, scale = -1, 1.0
        for prefix, value in self._lr_scales.items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, scale = len(prefix), value
        return scale

    @property
    def lr_scales(self) -> Dict[str, float]:
        """The ``{prefix: scale}`` set so far (see the constructor's ``lr_scales``)."""
        return dict(self._lr_scales)

    def set_lr_scales(self, scales: Mapping[str, float]) -> "MultiTaskModel":
        """Add or change learning-rate multipliers (``{parameter-name prefix: scale >= 0}``, 0 =
        frozen; see the constructor). Call before building the optimizer (``fit`` does so).

        Raises:
            ValueError: a negative scale or a prefix that matches no parameter.
        """
        names = [n for n, _ in self.named_parameters()]
        for prefix, value in dict(scales).items():
            if not float(value) >= 0.0:
                raise ValueError(f"lr_scales[{prefix!r}] must be >= 0, got {value}")
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                raise ValueError(f"lr_scales prefix {prefix!r} matches no parameter of the model")
            self._lr_scales[str(prefix)] = float(value)
        self._config["lr_scales"] = dict(self._lr_scales)
        collections = self._table_collections()
        tables: Dict[str, Dict[str, float]] = {prefix: {} for prefix in collections}
        for name, parameter in self.named_parameters():
            scale = self.lr_scale_of(name)
            prefix = next((p for p in collections if name.startswith(p)), None)
            if prefix is not None:
                tables[prefix][name[len(prefix):].split(".")[0]] = scale
            else:
                parameter.requires_grad_(scale > 0)
        for prefix, collection in collections.items():
            collection.set_table_lr_scale(tables[prefix])
        return self

    def _table_collections(self) -> Dict[str, EmbeddingBagCollection]:
        """``{parameter-name prefix of its tables: collection}``: the features' tables and, with an
        interaction term, its tables."""
        collections = {"embeddings.embedding_bags.": self.embeddings}
        if self.interaction is not None:
            collections["interaction.embeddings.embedding_bags."] = self.interaction.embeddings
        return collections

    def frozen_parameter_names(self) -> List[str]:
        """Names of the parameters that are not trained (scale 0, or tables frozen otherwise)."""
        frozen = {prefix + table for prefix, collection in self._table_collections().items()
                  for table in collection.frozen_tables}
        return [n for n, _ in self.named_parameters()
                if self.lr_scale_of(n) == 0.0 or n.rsplit(".", 1)[0] in frozen]

    # --- description ------------------------------------------------------------------------
    @property
    def tasks(self) -> List:
        """The TaskSpec list, in output column order."""
        return list(self._tasks)

    @property
    def config(self) -> dict:
        """A plain JSON-serialisable dict; ``MultiTaskModel.from_config(config)`` rebuilds the model
        (with fresh parameters: load the ``state_dict`` for the trained values)."""
        import copy
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: dict) -> "MultiTaskModel":
        """Build a model from `config` (as produced by ``model.config``)."""
        return cls(**config)

    def embedding_parameters(self) -> List[nn.Parameter]:
        """The embedding tables, the interaction term's included (with a fused embedding optimizer
        they do not require grad and are updated inside the backward: give them to no torch.optim
        optimizer)."""
        return [p for collection in self._table_collections().values() for p in collection.parameters()]

    def dense_parameters(self) -> List[nn.Parameter]:
        """Every other parameter: backbone (experts, gates), towers, the interaction term's scales."""
        embedding = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in embedding]

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels ``[B, T]`` (NaN = missing) that the outputs are trained and evaluated against.

        The labels themselves, except with the ESMM backbone: its post-click outputs are pCTCVR, so
        their targets are entire-space ``click AND conversion`` labels (0 on rows without a click,
        where the data usually leaves the post-click label NaN). Training on the raw labels with
        NaN rows dropped would fit pCTCVR on clicked rows only, which ESMM exists to avoid.
        """
        return self.backbone.targets(labels)

    def shared_parameters(self) -> List[nn.Parameter]:
        """The last layer all tasks share, where GradNorm (Chen et al., ICML 2018) measures the
        per-task gradient norms: the backbone's `shared_parameters`, or, when the backbone shares
        nothing (ESMM without a bottom, PLE without shared experts), the embedding tables that
        require grad (none with a fused embedding optimizer: then the list is empty)."""
        shared = self.backbone.shared_parameters()
        if shared:
            return shared
        return [p for p in self.embeddings.parameters() if p.requires_grad]

    # --- forward ----------------------------------------------------------------------------
    def _inputs(self, sparse, dense: Optional[torch.Tensor]) -> torch.Tensor:
        # the pooling groups' outputs and the dense columns in one cat: one copy, one backward split
        parts = self.embeddings.pooled_parts(sparse)
        batch = parts[0].shape[0]
        if dense is None:
            if self.dense_dim:
                raise ValueError(f"dense must be a float tensor [B, {self.dense_dim}], got None")
        else:
            if dense.dim() != 2 or dense.shape[1] != self.dense_dim or dense.shape[0] != batch:
                raise ValueError(
                    f"dense must be [B, dense_dim] = [{batch}, {self.dense_dim}] (B from the sparse batch), "
                    f"got {tuple(dense.shape)}"
                )
            if not dense.is_floating_point():
                raise TypeError(f"dense must be a float tensor, got {dense.dtype}")
            if self.dense_dim:
                # NaN would be NaN on the PyTorch path but a plausible score through multi_task_score (its
                # ReLU drops NaN): refuse it. One sum (~10 us for [2048, 8]) carries any NaN or inf; only a
                # non-finite sum (or an overflowing one) looks for the element. Not while training on a
                # GPU: reading the sum back would stall every step (there the PyTorch path runs, and a NaN
                # input shows as a NaN loss).
                if (dense.device.type == "cpu" or not self.training) and not math.isfinite(float(dense.sum())):
                    bad = (~torch.isfinite(dense)).nonzero()
                    if bad.numel():
                        row, column = (int(i) for i in bad[0])
                        raise ValueError(
                            f"dense must be finite, got {float(dense[row, column])} at row {row}, column {column}")
                parts = parts + [dense.to(parts[0].dtype)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _transforms(self) -> List[str]:
        """The fused path's output transform per task: sigmoid for binary tasks, except those that
        get the interaction term (their logit is transformed after the term is added)."""
        return ["sigmoid" if t.kind == "binary" and i not in self._interaction_columns else "identity"
                for i, t in enumerate(self._tasks)]

    def add_interaction(self, values: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        """``values`` (``[..., T]``, the interaction tasks' columns raw: logits or regression outputs)
        with ``scale_k * term`` (``term [...]``) added to the interaction tasks' columns and their
        binary columns passed through the sigmoid; the other columns unchanged."""
        columns = torch.tensor(self._interaction_columns, device=values.device)
        logits = values.index_select(-1, columns) + term.unsqueeze(-1) * self.interaction.scale
        binary = torch.tensor([self._tasks[c].kind == "binary" for c in self._interaction_columns], device=values.device)
        return values.index_copy(values.dim() - 1, columns, torch.where(binary, torch.sigmoid(logits), logits))

    @property
    def interaction_columns(self) -> List[int]:
        """Output columns (task indices) that get the interaction term (empty without one)."""
        return list(self._interaction_columns)

    def train(self, mode: bool = True) -> "MultiTaskModel":
        # Switching modes drops the packed scoring parameters: a cheap reset for in-place writes the
        # key below cannot see (through ``.data``). torch.optim steps, fused ones included (they do
        # not bump version counters; a stale pack once scored validation with the first epoch's
        # weights), are in the key.
        self._packed = None
        return super().train(mode)

    def _fused_params(self):
        """The packed `multi_task_score` parameters, rebuilt when any parameter changed: in-place
        writes and ``load_state_dict`` bump the tensors' version counters, every torch.optim step
        (fused ones too) advances the key, and `train` / `eval` drop the pack."""
        pieces = self.backbone._fused_scoring_params()
        if pieces is None:
            return None
        tensors = list(self.backbone.parameters()) + list(self.towers.parameters())
        key = weights_key(tensors)
        if self._packed is None or self._packed[0] != key:
            params = ops.pack_multi_task_params(
                pieces["experts"], pieces["gates"], pieces["gate_mask"],
                [list(tower.linears) for tower in self.towers], self._transforms(),
            )
            self._packed = (key, params)
        return self._packed[1]

    def forward(self, sparse, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._inputs(sparse, dense)
        term = None if self.interaction is None else self.interaction(sparse)
        if self.use_fused_scoring and not self.training and not torch.is_grad_enabled():
            params = self._fused_params()
            if params is not None:
                values = ops.multi_task_score(x, params)
                return self.backbone.outputs(values if term is None else self.add_interaction(values, term))
        if len(set(self.backbone.task_dims)) == 1:  # every backbone here: all towers in one batched pass
            values = tower_outputs(self.towers, self.backbone.stacked(x))
        else:
            values = torch.stack([tower(r) for tower, r in zip(self.towers, self.backbone(x))], dim=1)
        binary = [t.kind == "binary" and i not in self._interaction_columns for i, t in enumerate(self._tasks)]
        values = torch.where(torch.tensor(binary, device=values.device), torch.sigmoid(values), values)
        return self.backbone.outputs(values if term is None else self.add_interaction(values, term))
