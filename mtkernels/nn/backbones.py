"""Multi-task backbones: what sits between the input features and the task towers.

Every backbone maps ``x [B, D]`` to one representation per task (a list of T tensors
``[B, task_dims[t]]``) that the task's `TaskTower` turns into a prediction:

- `SharedBottom`: one MLP shared by all tasks (Caruana, 1997).
- `MMoE`: E expert MLPs mixed per task by a softmax gate (Ma et al., "Modeling Task Relationships
  in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018).
- `PLE`: Progressive Layered Extraction, stacked CGC layers of shared and task-specific experts
  (Tang et al., "Progressive Layered Extraction (PLE)", RecSys 2020).
- `ESMM`: Entire Space Multi-task Model, pCTCVR = pCTR x pCVR (Ma et al., SIGIR 2018).

Experts are `Expert` MLPs (ReLU after every layer) and gates one ``nn.Linear`` per task over the
experts it may use, followed by a softmax, so the eval network is exactly what
`mtkernels.ops.pack_multi_task_params` / `multi_task_score` compute (`_fused_scoring_params`).
Expert order is global (PLE: shared experts first, then task 0's, task 1's, ...); a gate's logits
follow the ascending order of the experts it may use.

Training path (the same network): experts and gates that read the same input run as one GEMM over
their concatenated weights (`experts_and_gates`), a gate's logit of an expert it may not use is
-inf; with one-layer experts (the presets) that GEMM has no bias and everything after it (the bias,
ReLU + dropout, the gates' softmaxes and the mixture, forward and backward, with the bias gradient)
is one `mtkernels.ops.expert_gate_mixture`, with
deeper experts ReLU + dropout is `mtkernels.ops.relu_dropout` and the softmax and mixture of all gates
one `mtkernels.ops.gated_mixture`; `stacked` returns the task representations as one ``[B, T, H]``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.expert_gate_mixture import expert_gate_mixture
from ..ops.gated_mixture import gated_mixture
from ..ops.relu_dropout import relu_dropout
from .towers import Expert

TASK_KINDS = ("binary", "regression")


def _check_num_tasks(owner: str, num_tasks: int) -> int:
    if int(num_tasks) < 1:
        raise ValueError(f"{owner}: num_tasks must be >= 1, got {num_tasks}")
    return int(num_tasks)


def _gate(input_dim: int, num_experts: int) -> nn.Module:
    """A gate's logit layer; with a single allowed expert there is nothing to choose (weight 1), and
    an ``nn.Identity`` placeholder keeps the ModuleList positions (and state_dict keys) aligned."""
    return nn.Linear(input_dim, num_experts) if num_experts > 1 else nn.Identity()


def _deeper_layers(experts: Sequence[Expert], h: torch.Tensor) -> torch.Tensor:
    """Layers 1.. of all experts on their first-layer activations ``h [B, E, H_1]``, one batched
    product per layer over the experts: ``[B, E, H_last]``."""
    dropout, training = experts[0].dropout, experts[0].training
    for layer in range(1, len(experts[0].linears)):
        weight = torch.stack([expert.linears[layer].weight for expert in experts])  # [E, O, I]
        bias = torch.stack([expert.linears[layer].bias for expert in experts])  # [E, O]
        h = torch.baddbmm(bias.unsqueeze(1), h.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
        h = relu_dropout(h, dropout, training)
    return h


def expert_outputs(experts: Sequence[Expert], x: torch.Tensor) -> torch.Tensor:
    """``[B, E, H]``: every expert (same layer sizes) applied to ``x [B, D]``, batched: the first
    layers of all experts as one matrix product over their concatenated weights, deeper layers as one
    batched product over the experts. Equal to stacking ``expert(x)``, with one GEMM instead of E
    (and no stacking copy), which matters at the small widths of recommendation experts."""
    if len(experts) == 1:
        return experts[0](x).unsqueeze(1)
    first = [expert.linears[0] for expert in experts]
    h = F.linear(x, torch.cat([l.weight for l in first]), torch.cat([l.bias for l in first]))
    h = relu_dropout(h, experts[0].dropout, experts[0].training)
    return _deeper_layers(experts, h.view(x.shape[0], len(experts), -1))


def _gate_rows(gates: Sequence[nn.Module], allowed: Sequence[Sequence[int]], num_experts: int) -> Optional[torch.Tensor]:
    """Where each of the ``G * E`` rows of the full gate matrix (gate g's logit of expert e) comes
    from in ``cat(the nn.Linear gates' rows, [zero row, zero row])`` with biases ``cat(their biases,
    [0, -inf])``: a gate's own row when it may use e, the first zero row (logit 0) for the one expert
    of a single-expert gate (``nn.Identity``), the second (logit -inf, softmax weight 0) for an
    expert it may not use. ``None`` when every gate is an ``nn.Linear`` over all E experts (the rows
    are the gates' rows in order: MMoE)."""
    if all(isinstance(g, nn.Linear) for g in gates) and all(list(a) == list(range(num_experts)) for a in allowed):
        return None
    num_rows = sum(g.out_features for g in gates if isinstance(g, nn.Linear))
    rows, start = [], 0
    for gate, experts in zip(gates, allowed):
        position = {e: i for i, e in enumerate(experts)}
        for e in range(num_experts):
            if e not in position:
                rows.append(num_rows + 1)
            elif isinstance(gate, nn.Linear):
                rows.append(start + position[e])
            else:
                rows.append(num_rows)
        if isinstance(gate, nn.Linear):
            start += gate.out_features
    return torch.tensor(rows, dtype=torch.long)


def _gate_matrix(gates: Sequence[nn.Module], rows: Optional[torch.Tensor], input_dim: int):
    """All gates' logit layers as one ``[G * E, D]`` weight and ``[G * E]`` bias (see `_gate_rows`)."""
    linears = [g for g in gates if isinstance(g, nn.Linear)]
    if rows is None:
        return torch.cat([g.weight for g in linears]), torch.cat([g.bias for g in linears])
    reference = next(iter(linears), None)
    like = reference.weight if reference is not None else None
    zeros = torch.zeros(2, input_dim, dtype=like.dtype if like is not None else torch.get_default_dtype(),
                        device=like.device if like is not None else rows.device)
    weight = torch.cat([g.weight for g in linears] + [zeros])
    bias = torch.cat([g.bias for g in linears] + [zeros.new_tensor([0.0, -math.inf])])
    return weight.index_select(0, rows.to(weight.device)), bias.index_select(0, rows.to(weight.device))


def _experts_and_gates_layer(experts: Sequence[Expert], gates: Sequence[nn.Module], rows: Optional[torch.Tensor],
                             input_dim: int):
    """``(weight [E*H_1 + G*E, D], bias [E*H_1 + G*E], E*H_1)``: the experts' first layers and all
    gates' logit layers concatenated (the layout of `multi_task_score`), one GEMM's operands."""
    first = [expert.linears[0] for expert in experts]
    gate_weight, gate_bias = _gate_matrix(gates, rows, input_dim)
    weight = torch.cat([l.weight for l in first] + [gate_weight])
    bias = torch.cat([l.bias for l in first] + [gate_bias])
    return weight, bias, sum(l.out_features for l in first)


def mixed_experts(experts: Sequence[Expert], gates: Sequence[nn.Module], rows: Optional[torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
    """``[B, G, H]``: every gate's softmax mixture of the experts, all reading ``x [B, D]``.

    One GEMM for the experts' first layers and the gates' logits (`experts_and_gates`); with
    one-layer experts (the presets) that GEMM is ``x W^T`` without its bias and the rest (bias, ReLU
    + dropout, softmaxes, mixture, and all of their backward, the bias gradient included) is one
    `mtkernels.ops.expert_gate_mixture`, else `gated_mixture` over the deeper layers' outputs.
    """
    if len(experts[0].linears) == 1:
        # the GEMM without its bias (no addmm broadcast copy); the op adds it while reading each row
        weight, bias, _ = _experts_and_gates_layer(experts, gates, rows, x.shape[1])
        return expert_gate_mixture(F.linear(x, weight), len(experts), len(gates), experts[0].dropout,
                                   experts[0].training, bias=bias)[0]
    outputs, logits = experts_and_gates(experts, gates, rows, x)
    return gated_mixture(logits, outputs)[0]


def experts_and_gates(experts: Sequence[Expert], gates: Sequence[nn.Module], rows: Optional[torch.Tensor],
                      x: torch.Tensor):
    """Experts and gates that all read ``x [B, D]``: the first layers of all E experts and every
    gate's logits as ONE matrix product over their concatenated weights (the layout the inference
    op `multi_task_score` uses), then ReLU + dropout on the expert part and the deeper expert layers.

    Returns ``(expert outputs [B, E, H], gate logits [B, G, E])``, a logit -inf where a gate may not
    use an expert (``rows`` from `_gate_rows`), ready for `mtkernels.ops.gated_mixture`.
    """
    weight, bias, width = _experts_and_gates_layer(experts, gates, rows, x.shape[1])
    z = F.linear(x, weight, bias)
    # split, not two slices: its backward is one cat of the two gradients instead of two zero-filled
    # [B, E*H + G*E] tensors added together
    z_experts, z_gates = z.split([width, z.shape[1] - width], dim=1)
    h = relu_dropout(z_experts, experts[0].dropout, experts[0].training)
    outputs = _deeper_layers(experts, h.view(x.shape[0], len(experts), -1))
    return outputs, z_gates.view(x.shape[0], len(gates), len(experts))


def _gate_weights(gate: nn.Module, gate_input: torch.Tensor) -> torch.Tensor:
    if isinstance(gate, nn.Identity):
        return gate_input.new_ones(gate_input.shape[0], 1)
    return torch.softmax(gate(gate_input), dim=-1)


def _linear_or_none(gate: nn.Module) -> Optional[nn.Linear]:
    return None if isinstance(gate, nn.Identity) else gate


class MultiTaskBackbone(nn.Module):
    """Base class: ``forward(x [B, D]) -> list of T tensors [B, task_dims[t]]``.

    Attributes:
        num_tasks: T.
        task_dims: width of each task's representation (the input width of its tower).
    """

    num_tasks: int
    task_dims: List[int]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """The task representations as one tensor ``[B, T, H]`` (every ``task_dims[t] == H``), what
        the model's batched towers read; ``torch.stack(self(x), 1)`` unless a backbone builds it
        directly."""
        return torch.stack(self(x), dim=1)

    def outputs(self, predictions: torch.Tensor) -> torch.Tensor:
        """Map the per-tower predictions ``[B, T]`` (after each task's transform) to the model's
        outputs; the identity except for `ESMM`."""
        return predictions

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels ``[B, T]`` (NaN = no label) the outputs are trained against; the labels
        themselves except for `ESMM`."""
        return labels

    def shared_parameters(self) -> List[nn.Parameter]:
        """The parameters of the last layer every task reads (GradNorm's W, Chen et al., ICML 2018:
        task gradient norms are measured there); empty when only the inputs are shared."""
        return []

    def _fused_scoring_params(self) -> Optional[Dict[str, object]]:
        """The backbone's inputs of `mtkernels.ops.pack_multi_task_params`: ``{"experts": list of
        lists of nn.Linear, "gates": list (per task) of nn.Linear or None, "gate_mask": BoolTensor
        [T, E]}``; ``None`` when the backbone is not one layer of experts and gates over ``x``."""
        return None


class SharedBottom(MultiTaskBackbone):
    """Shared-Bottom: one `Expert` MLP shared by every task (hard parameter sharing).

    Args:
        input_dim: D.
        num_tasks: T.
        hidden: widths of the shared MLP (ReLU after every layer).
        dropout: dropout after each ReLU (training only).

    Shapes: ``x [B, D] -> T x [B, hidden[-1]]`` (the same tensor for every task).
    ``state_dict`` keys: ``bottom.linears.<i>.weight/bias``.
    """

    def __init__(self, input_dim: int, num_tasks: int, hidden: Sequence[int] = (128, 64),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_tasks = _check_num_tasks("SharedBottom", num_tasks)
        self.bottom = Expert(input_dim, hidden, dropout)
        self.task_dims = [self.bottom.output_dim] * self.num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        shared = self.bottom(x)
        return [shared] * self.num_tasks

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottom(x).unsqueeze(1).expand(-1, self.num_tasks, -1)

    def shared_parameters(self) -> List[nn.Parameter]:
        return list(self.bottom.linears[-1].parameters())

    def _fused_scoring_params(self):
        return {
            "experts": [list(self.bottom.linears)],
            "gates": [None] * self.num_tasks,
            "gate_mask": torch.ones(self.num_tasks, 1, dtype=torch.bool),
        }


class MMoE(MultiTaskBackbone):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    ``f_t(x) = sum_e g_t(x)_e * expert_e(x)`` with ``g_t(x) = softmax(W_t x + b_t)`` over the E
    experts, one gate per task.

    Args:
        input_dim: D.
        num_tasks: T.
        num_experts: E (with E = 1 there is no gate: Shared-Bottom).
        expert_hidden: widths of each expert MLP (ReLU after every layer).
        dropout: dropout after each expert ReLU (training only).

    Shapes: ``x [B, D] -> T x [B, expert_hidden[-1]]``; `gate_weights` ``-> T x [B, E]``.
    ``state_dict`` keys: ``experts.<e>.linears.<i>.*``, ``gates.<t>.weight/bias``.

    Raises:
        ValueError: T < 1, E < 1, bad widths or dropout.
    """

    def __init__(self, input_dim: int, num_tasks: int, num_experts: int = 4,
                 expert_hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        self.num_tasks = _check_num_tasks("MMoE", num_tasks)
        if int(num_experts) < 1:
            raise ValueError(f"MMoE: num_experts must be >= 1, got {num_experts}")
        self.num_experts = int(num_experts)
        self.experts = nn.ModuleList(Expert(input_dim, expert_hidden, dropout) for _ in range(self.num_experts))
        self.gates = nn.ModuleList(_gate(int(input_dim), self.num_experts) for _ in range(self.num_tasks))
        self.task_dims = [self.experts[0].output_dim] * self.num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.stacked(x).unbind(1))

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]``: the experts' first layers and the gates in one GEMM, then the gates'
        softmax and the mixture in one `mtkernels.ops.gated_mixture`."""
        if self.num_experts == 1:
            return self.experts[0](x).unsqueeze(1).expand(-1, self.num_tasks, -1)
        return mixed_experts(self.experts, self.gates, None, x)

    def gate_weights(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Each task's softmax weights over the experts: T tensors ``[B, E]``, rows sum to 1."""
        return [_gate_weights(gate, x) for gate in self.gates]

    def shared_parameters(self) -> List[nn.Parameter]:
        """Every expert's output layer (each task mixes all experts)."""
        return [p for expert in self.experts for p in expert.linears[-1].parameters()]

    def _fused_scoring_params(self):
        return {
            "experts": [list(expert.linears) for expert in self.experts],
            "gates": [_linear_or_none(gate) for gate in self.gates],
            "gate_mask": torch.ones(self.num_tasks, self.num_experts, dtype=torch.bool),
        }


class CGC(nn.Module):
    """One Customized Gate Control layer of PLE (Tang et al., RecSys 2020, §4.2-4.3).

    ``num_shared_experts`` shared experts and ``num_task_experts`` experts per task. Task t's gate
    mixes its own and the shared experts' outputs; with ``shared_gate=True`` (every extraction
    level but the last) a shared gate mixes all experts into the next level's shared input.
    Expert order: shared first, then task 0's, task 1's, ...; a gate's logits follow it.

    Forward: ``task_inputs`` T tensors ``[B, D]`` and ``shared_input [B, D]`` (all ``x`` at the
    first level) -> ``(T tensors [B, H], [B, H] or None)``.
    """

    def __init__(self, input_dim: int, num_tasks: int, num_shared_experts: int, num_task_experts: int,
                 expert_hidden: Sequence[int], dropout: float, shared_gate: bool) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        make = lambda: Expert(input_dim, expert_hidden, dropout)  # noqa: E731
        self.shared_experts = nn.ModuleList(make() for _ in range(num_shared_experts))
        self.task_experts = nn.ModuleList(
            nn.ModuleList(make() for _ in range(num_task_experts)) for _ in range(num_tasks)
        )
        self.task_gates = nn.ModuleList(
            _gate(input_dim, num_shared_experts + num_task_experts) for _ in range(num_tasks)
        )
        self.shared_gate = (
            _gate(input_dim, num_shared_experts + num_tasks * num_task_experts) if shared_gate else None
        )
        self.output_dim = (self.shared_experts[0] if num_shared_experts else self.task_experts[0][0]).output_dim
        num_experts = num_shared_experts + num_tasks * num_task_experts
        shared = list(range(num_shared_experts))
        allowed = [shared + [num_shared_experts + t * num_task_experts + i for i in range(num_task_experts)]
                   for t in range(num_tasks)]
        if shared_gate:
            allowed.append(list(range(num_experts)))
        self._gates = list(self.task_gates) + ([self.shared_gate] if shared_gate else [])
        # which row of the concatenated gate layers each (gate, expert) logit reads (-inf: not allowed)
        self._rows = _gate_rows(self._gates, allowed, num_experts)

    def _expert_outputs(self, task_inputs, shared_input) -> torch.Tensor:
        """All experts' outputs ``[B, E, H]`` in the global order (shared, task 0's, task 1's, ...)."""
        if all(t is shared_input for t in task_inputs):  # first level: every expert reads x, batch them all
            experts = list(self.shared_experts) + [e for task in self.task_experts for e in task]
            return expert_outputs(experts, shared_input)
        groups = [expert_outputs(self.shared_experts, shared_input)] if self.num_shared_experts else []
        if self.num_task_experts:
            groups += [expert_outputs(experts, task_inputs[t]) for t, experts in enumerate(self.task_experts)]
        return torch.cat(groups, dim=1)

    def mixed(self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor) -> torch.Tensor:
        """``[B, G, H]``: each gate's mixture of the experts it may use (T task gates, then the
        shared gate when there is one), through one `mtkernels.ops.gated_mixture` over all experts
        with -inf logits for the experts a gate may not use."""
        if all(t is shared_input for t in task_inputs):  # first level: one GEMM for every expert and gate
            experts = list(self.shared_experts) + [e for task in self.task_experts for e in task]
            return mixed_experts(experts, self._gates, self._rows, shared_input)
        else:
            outputs = self._expert_outputs(task_inputs, shared_input)
            weight, bias = _gate_matrix(self._gates, self._rows, shared_input.shape[1])
            num_experts = outputs.shape[1]
            inputs = list(task_inputs) + ([shared_input] if self.shared_gate is not None else [])
            logits = torch.stack([F.linear(v, weight[g * num_experts:(g + 1) * num_experts],
                                           bias[g * num_experts:(g + 1) * num_experts])
                                  for g, v in enumerate(inputs)], dim=1)
        return gated_mixture(logits, outputs)[0]

    def forward(self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor):
        mixed = self.mixed(task_inputs, shared_input)
        return list(mixed[:, : self.num_tasks].unbind(1)), (mixed[:, self.num_tasks] if self.shared_gate is not None else None)

    def gate_weights(self, task_inputs, shared_input) -> List[torch.Tensor]:
        weights = [_gate_weights(gate, task_inputs[t]) for t, gate in enumerate(self.task_gates)]
        if self.shared_gate is not None:
            weights.append(_gate_weights(self.shared_gate, shared_input))
        return weights


class PLE(MultiTaskBackbone):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): ``num_levels`` stacked CGC layers.

    Level 1 takes ``x`` as every input; level k > 1 takes task t's output of level k-1 as task t's
    input and the shared gate's output as the shared input. The last level has no shared gate and
    its task outputs feed the towers. With one level this is CGC (the paper's single-level model).

    Args:
        input_dim: D.
        num_tasks: T.
        num_levels: number of extraction levels (>= 1).
        num_shared_experts: shared experts per level (>= 0).
        num_task_experts: task-specific experts per task per level (>= 0; the two may not both be 0).
        expert_hidden: widths of each expert MLP (ReLU after every layer).
        dropout: dropout after each expert ReLU (training only).

    Shapes: ``x [B, D] -> T x [B, expert_hidden[-1]]``; `gate_weights` ``->`` per level, T task
    gates ``[B, num_shared_experts + num_task_experts]`` then (not at the last level) the shared
    gate ``[B, num_shared_experts + T * num_task_experts]``.
    ``state_dict`` keys: ``levels.<k>.shared_experts.<e>.*``, ``levels.<k>.task_experts.<t>.<e>.*``,
    ``levels.<k>.task_gates.<t>.*``, ``levels.<k>.shared_gate.*``.

    Raises:
        ValueError: T < 1, num_levels < 1, negative expert counts or none at all, bad widths.
    """

    def __init__(self, input_dim: int, num_tasks: int, num_levels: int = 1, num_shared_experts: int = 1,
                 num_task_experts: int = 1, expert_hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        self.num_tasks = _check_num_tasks("PLE", num_tasks)
        if int(num_levels) < 1:
            raise ValueError(f"PLE: num_levels must be >= 1, got {num_levels}")
        if int(num_shared_experts) < 0 or int(num_task_experts) < 0:
            raise ValueError(f"PLE: expert counts must be >= 0, got num_shared_experts={num_shared_experts}, "
                             f"num_task_experts={num_task_experts}")
        if int(num_shared_experts) + int(num_task_experts) < 1:
            raise ValueError("PLE: each task needs at least one expert (num_shared_experts + num_task_experts >= 1)")
        self.num_levels = int(num_levels)
        levels = []
        dim = int(input_dim)
        for level in range(self.num_levels):
            cgc = CGC(dim, self.num_tasks, int(num_shared_experts), int(num_task_experts), expert_hidden,
                      dropout, shared_gate=level < self.num_levels - 1)
            levels.append(cgc)
            dim = cgc.output_dim
        self.levels = nn.ModuleList(levels)
        self.task_dims = [dim] * self.num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.stacked(x).unbind(1))

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        task_inputs, shared_input = [x] * self.num_tasks, x
        for cgc in self.levels[:-1]:
            task_inputs, shared_input = cgc(task_inputs, shared_input)
        return self.levels[-1].mixed(task_inputs, shared_input)

    def gate_weights(self, x: torch.Tensor) -> List[List[torch.Tensor]]:
        """Softmax weights of every gate, per level (see the class docstring); rows sum to 1."""
        weights = []
        task_inputs, shared_input = [x] * self.num_tasks, x
        for cgc in self.levels:
            weights.append(cgc.gate_weights(task_inputs, shared_input))
            task_inputs, shared_input = cgc(task_inputs, shared_input)
        return weights

    def shared_parameters(self) -> List[nn.Parameter]:
        """The output layers of the shared experts of the deepest level that has any (all levels
        share the same expert counts, so: the last level's, or none without shared experts)."""
        return [p for expert in self.levels[-1].shared_experts for p in expert.linears[-1].parameters()]

    def _fused_scoring_params(self):
        # The fused op takes one input for every expert and gate: only the first level sees x alone.
        if self.num_levels != 1:
            return None
        cgc = self.levels[0]
        experts = [list(e.linears) for e in cgc.shared_experts]
        experts += [list(e.linears) for task in cgc.task_experts for e in task]
        mask = torch.zeros(self.num_tasks, len(experts), dtype=torch.bool)
        mask[:, : cgc.num_shared_experts] = True
        for t in range(self.num_tasks):
            start = cgc.num_shared_experts + t * cgc.num_task_experts
            mask[t, start : start + cgc.num_task_experts] = True
        return {"experts": experts, "gates": [_linear_or_none(g) for g in cgc.task_gates], "gate_mask": mask}


class ESMM(MultiTaskBackbone):
    """Entire Space Multi-task Model (Ma et al., "Entire Space Multi-Task Model: An Effective
    Approach for Estimating Post-Click Conversion Rate", SIGIR 2018).

    The CTR task and each post-click binary task (CVR) have their own towers over shared inputs (in
    the paper, the shared embeddings; ``hidden`` optionally adds a shared bottom MLP). The model
    outputs pCTR and, for each post-click task, pCTCVR = pCTR x pCVR, so both losses are taken over
    the entire impression space: train the post-click output against ``click AND conversion``
    labels on all impressions (0 where there was no click; `targets` builds them from the raw
    labels), never against labels restricted to clicked rows. pCVR itself is ``pCTCVR / pCTR``. Regression tasks pass through unchanged.

    Args:
        input_dim: D.
        task_kinds: T kinds, ``"binary"`` or ``"regression"``.
        ctr_task: index of the CTR task (binary); every other binary task is a post-click task.
        hidden: widths of an optional shared bottom MLP (empty: towers read ``x`` itself).
        dropout: dropout after each bottom ReLU (training only).

    Shapes: ``x [B, D] -> T x [B, H]`` (H = ``hidden[-1]`` or D); `outputs` ``[B, T] -> [B, T]``.
    ``state_dict`` keys: ``bottom.linears.<i>.*`` when ``hidden`` is given.

    Raises:
        ValueError: an unknown kind, ``ctr_task`` out of range or not binary.
    """

    def __init__(self, input_dim: int, task_kinds: Sequence[str], ctr_task: int = 0,
                 hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        self.task_kinds = list(task_kinds)
        self.num_tasks = _check_num_tasks("ESMM", len(self.task_kinds))
        bad = [k for k in self.task_kinds if k not in TASK_KINDS]
        if bad:
            raise ValueError(f"ESMM: task kinds must be in {TASK_KINDS}, got {bad}")
        if not 0 <= int(ctr_task) < self.num_tasks or self.task_kinds[int(ctr_task)] != "binary":
            raise ValueError(f"ESMM: ctr_task must index a binary task among {self.task_kinds}, got {ctr_task}")
        self.ctr_task = int(ctr_task)
        self.ctcvr_tasks = [t for t, k in enumerate(self.task_kinds) if k == "binary" and t != self.ctr_task]
        if int(input_dim) < 1:
            raise ValueError(f"ESMM: input_dim must be >= 1, got {input_dim}")
        self.bottom = Expert(input_dim, hidden, dropout) if len(hidden) else None
        width = self.bottom.output_dim if self.bottom is not None else int(input_dim)
        self.task_dims = [width] * self.num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        shared = self.bottom(x) if self.bottom is not None else x
        return [shared] * self.num_tasks

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bottom(x) if self.bottom is not None else x
        return shared.unsqueeze(1).expand(-1, self.num_tasks, -1)

    def outputs(self, predictions: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` (pCTR, pCVR_t, ...) -> ``[B, T]`` (pCTR, pCTCVR_t = pCTR * pCVR_t, ...)."""
        ctr = predictions[:, self.ctr_task]
        columns = [ctr * predictions[:, t] if t in self.ctcvr_tasks else predictions[:, t]
                   for t in range(self.num_tasks)]
        return torch.stack(columns, dim=1)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Entire-space labels: a post-click task's target is ``click AND conversion``, so it is 0
        on every row without a click (where a post-click label is usually missing, NaN) and the
        conversion label on clicked rows; rows with an unknown click stay unknown (NaN)."""
        if labels.dim() != 2 or labels.shape[1] != self.num_tasks:
            raise ValueError(f"labels must be [B, {self.num_tasks}], got {tuple(labels.shape)}")
        click = labels[:, self.ctr_task]
        columns = [torch.where(click == 0, torch.zeros_like(click), torch.where(click == 1, labels[:, t], click))
                   if t in self.ctcvr_tasks else labels[:, t] for t in range(self.num_tasks)]
        return torch.stack(columns, dim=1)

    def shared_parameters(self) -> List[nn.Parameter]:
        return [] if self.bottom is None else list(self.bottom.linears[-1].parameters())

    def _fused_scoring_params(self):
        if self.bottom is None:  # the towers read x directly: no expert layer for the fused op
            return None
        return {
            "experts": [list(self.bottom.linears)],
            "gates": [None] * self.num_tasks,
            "gate_mask": torch.ones(self.num_tasks, 1, dtype=torch.bool),
        }
