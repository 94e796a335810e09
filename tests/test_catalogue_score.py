"""`catalogue_score`: the native op and its reference against the eager network over every
(user, item) pair, `split_first_layer`, empty and ragged shapes, bad input, opcheck."""

from __future__ import annotations

import pytest
import torch

from mtkernels import reference
from mtkernels._extension import has_kernel
from mtkernels.ops import CatalogueScoreParams, catalogue_score, split_first_layer

from test_multi_task_score import CONFIGS, make

NATIVE = has_kernel("catalogue_score", "cpu")
native_only = pytest.mark.skipif(not NATIVE, reason="native catalogue_score kernel not built")
USER_WIDTH, ITEM_WIDTH = 5, 8  # D = 13 columns: WIDTH of test_multi_task_score


def _parts(model, users, items, seed=0, dtype=torch.float32):
    """Users' and items' columns, the eager model's scores of every pair [U, N, T], and the
    factorised first layer's parts with the rest of the network."""
    gen = torch.Generator().manual_seed(seed)
    x_user = torch.randn(users, USER_WIDTH, generator=gen, dtype=torch.float64).to(dtype)
    x_item = torch.randn(items, ITEM_WIDTH, generator=gen, dtype=torch.float64).to(dtype)
    model = model.to(dtype)
    pairs = torch.cat([x_user.repeat_interleave(items, 0), x_item.repeat(users, 1)], dim=1)
    with torch.no_grad():
        expected = model(pairs).reshape(users, items, model.gate_mask.shape[0])
        weight, bias, rest = split_first_layer(model.pack())
        user_part = x_user @ weight[:, :USER_WIDTH].t()
        item_part = x_item @ weight[:, USER_WIDTH:].t() + bias
    return expected, user_part, item_part, rest


SCORERS = {"reference": reference.catalogue_score, "ops": catalogue_score}


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("users, items", [(0, 7), (4, 0), (1, 1), (3, 37), (17, 61)])
def test_float32_matches_the_eager_model_on_every_pair(scorer, config, users, items):
    model = make(config, seed=users + items)
    expected, user_part, item_part, rest = _parts(model, users, items, seed=users)
    with torch.no_grad():
        got = SCORERS[scorer](user_part, item_part, rest)
    assert got.shape == (users, items, model.gate_mask.shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_float64_runs_on_the_reference(config):
    model = make(config, seed=5)
    expected, user_part, item_part, rest = _parts(model, 3, 11, dtype=torch.float64)
    with torch.no_grad():
        got = catalogue_score(user_part, item_part, rest)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@native_only
@pytest.mark.parametrize("shape", [(1, 200), (50, 3), (7, 1682)])
def test_native_matches_the_reference_on_random_params_and_threads(shape):
    model = make("ple_cgc", seed=9)
    _, user_part, item_part, rest = _parts(model, *shape, seed=2)
    expected = reference.catalogue_score(user_part, item_part, rest)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = torch.ops.mtkernels.catalogue_score.default(user_part, item_part, *rest)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    finally:
        torch.set_num_threads(threads)


def test_hand_made_gate_and_relu():
    # 2 one-unit experts, 1 task over both, tower = identity. Pair (u, n): a = user[u] + item[n];
    # expert e = relu(a[e]); gate = softmax(a[2:4]); score = gate . experts.
    rest = CatalogueScoreParams((), (), torch.ones(1, 2, dtype=torch.bool), (torch.ones(1, 1, 1),),
                                (torch.zeros(1, 1),), ("identity",))
    user_part = torch.tensor([[1.0, -3.0, 0.0, 0.0], [2.0, 2.0, 1.0, -1.0]])
    item_part = torch.tensor([[0.5, 1.0, 0.0, 2.0]])
    for scorer in SCORERS.values():
        got = scorer(user_part, item_part, rest)
        g0 = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # user 0: experts relu(1.5)=1.5, relu(-2)=0
        g1 = torch.softmax(torch.tensor([1.0, 1.0]), 0)  # user 1: experts 2.5, 3
        want = torch.tensor([[[g0[0] * 1.5]], [[g1[0] * 2.5 + g1[1] * 3.0]]])
        torch.testing.assert_close(got, want)


def test_split_first_layer_layout():
    model = make("ple_cgc")
    params = model.pack()
    weight, bias, rest = split_first_layer(params)
    num_tasks, num_experts, width = params.gate_weight.shape
    hidden = params.expert_weights[0].shape[1]
    assert weight.shape == (num_experts * hidden + num_tasks * num_experts, width)
    torch.testing.assert_close(weight[hidden : 2 * hidden], params.expert_weights[0][1])
    torch.testing.assert_close(weight[num_experts * hidden + num_experts + 4], params.gate_weight[1, 4])
    torch.testing.assert_close(bias[num_experts * hidden :], params.gate_bias.reshape(-1))
    assert len(rest.expert_weights) == len(params.expert_weights) - 1 and rest.transforms == params.transforms
    with pytest.raises(TypeError, match="MultiTaskScoreParams"):
        split_first_layer(rest)


def _bad(case):
    model = make("mmoe")
    _, user_part, item_part, rest = _parts(model, 2, 3)
    if case == "columns":
        return user_part[:, :-1], item_part[:, :-1], rest, ValueError, "E\\*H_1 \\+ T\\*E columns"
    if case == "item_columns":
        return user_part, item_part[:, :-2], rest, ValueError, "item_part must have user_part's"
    if case == "user_dim":
        return user_part[0], item_part, rest, ValueError, "user_part"
    if case == "item_dtype":
        return user_part, item_part.double(), rest, TypeError, "item_part must have user_part's dtype"
    if case == "mask_dtype":
        return user_part, item_part, rest._replace(gate_mask=rest.gate_mask.float()), TypeError, "params.gate_mask"
    if case == "empty_mask_row":
        mask = rest.gate_mask.clone()
        mask[1] = False
        return user_part, item_part, rest._replace(gate_mask=mask), ValueError, "at least one expert"
    if case == "tower_shape":
        weights = (rest.tower_weights[0][:, :, :-1],) + rest.tower_weights[1:]
        return user_part, item_part, rest._replace(tower_weights=weights), ValueError, "params.tower_weights\\[0\\]"
    if case == "expert_bias":
        biases = (rest.expert_biases[0][:, :-1],)
        return user_part, item_part, rest._replace(expert_biases=biases), ValueError, "params.expert_biases\\[0\\]"
    if case == "transform":
        return user_part, item_part, rest._replace(transforms=("sigmoid", "tanh", "identity")), ValueError, \
            "params.transforms\\[1\\]"
    raise AssertionError(case)


BAD = ["columns", "item_columns", "user_dim", "item_dtype", "mask_dtype", "empty_mask_row", "tower_shape",
       "expert_bias", "transform"]


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_naming_the_argument(scorer, case):
    user_part, item_part, rest, error, message = _bad(case)
    with pytest.raises(error, match=message):
        SCORERS[scorer](user_part, item_part, rest)


@native_only
@pytest.mark.parametrize("case", BAD)
def test_native_op_rejects_bad_input_itself(case):
    user_part, item_part, rest, error, message = _bad(case)
    if case == "item_dtype":  # the wrapper routes by user_part's dtype; the op checks item_part
        message = "item_part must have user_part's dtype"
    with pytest.raises(error, match=message):
        torch.ops.mtkernels.catalogue_score.default(user_part, item_part, *rest)


def test_grad_mode_with_trainable_parts_is_refused():
    model = make("mmoe")
    _, user_part, item_part, rest = _parts(model, 2, 3)
    with pytest.raises(RuntimeError, match="inference-only"):
        catalogue_score(user_part.requires_grad_(), item_part, rest)
    with pytest.raises(TypeError, match="CatalogueScoreParams"):
        catalogue_score(user_part.detach(), item_part, tuple(rest))


@native_only
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("users, items", [(0, 5), (3, 7)])
def test_opcheck(config, users, items):
    _, user_part, item_part, rest = _parts(make(config), users, items)
    torch.library.opcheck(torch.ops.mtkernels.catalogue_score.default, (user_part, item_part, *rest))


@native_only
def test_non_contiguous_parts():
    model = make("shared_bottom")
    expected, user_part, item_part, rest = _parts(model, 4, 9)
    got = catalogue_score(user_part.t().contiguous().t(), item_part.t().contiguous().t(), rest)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
