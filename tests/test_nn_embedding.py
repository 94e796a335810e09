"""EmbeddingBagCollection against a per-feature nn.EmbeddingBag computation, its layout, state_dict
and errors, and the fused optimizer."""

import pytest
import torch
from torch import nn

from mtkernels import KeyedJaggedTensor
from mtkernels.nn import EmbeddingBagCollection, EmbeddingBagConfig


def _tables(mixed_pooling=None):
    """mixed_pooling: None (all sum), "last" (the last table pools by mean: the output columns come
    straight from the two op calls), "middle" (the middle one: the columns are permuted back)."""
    return [
        EmbeddingBagConfig("users", 11, 4, ["user_id"]),
        # one table shared by two features
        EmbeddingBagConfig("items", 23, 8, ["item_id", "last_item"],
                           pooling="mean" if mixed_pooling == "middle" else "sum"),
        EmbeddingBagConfig("genres", 7, 3, ["genres"], pooling="mean" if mixed_pooling == "last" else "sum"),
    ]


def _random_kjt(ebc, batch, generator, index_dtype=torch.int64, max_len=4, weighted=False, keys=None):
    rows = {f: t.num_embeddings for t in ebc.tables for f in t.feature_names}
    keys = keys or ebc.feature_names
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=generator)
    values = []
    for k, key in enumerate(keys):
        n = int(lengths[k * batch:(k + 1) * batch].sum())
        values.append(torch.randint(0, rows.get(key, 5), (n,), generator=generator))
    values = torch.cat(values).to(index_dtype)
    weights = torch.rand(values.numel(), generator=generator) if weighted else None
    return KeyedJaggedTensor(keys, values, lengths=lengths.to(index_dtype), weights=weights)


def _expected(ebc, kjt):
    """One nn.EmbeddingBag per feature over a copy of its table: the definition of the output."""
    columns = []
    for table in ebc.tables:
        for feature in table.feature_names:
            bag = nn.EmbeddingBag(table.num_embeddings, table.embedding_dim, mode=table.pooling)
            with torch.no_grad():
                bag.weight.copy_(ebc.embedding_bags[table.name].weight)
            jagged = kjt[feature]
            offsets = torch.zeros(jagged["lengths"].numel(), dtype=torch.long)
            offsets[1:] = torch.cumsum(jagged["lengths"].long(), 0)[:-1]
            columns.append(bag(jagged["values"].long(), offsets, per_sample_weights=jagged["weights"]))
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("batch", [1, 5, 37])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mixed_pooling", [None, "last", "middle"])
def test_matches_per_feature_embedding_bag(batch, index_dtype, mixed_pooling):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(batch)
    ebc = EmbeddingBagCollection(_tables(mixed_pooling))
    assert (ebc._column_permutation is None) == (mixed_pooling != "middle")
    kjt = _random_kjt(ebc, batch, generator, index_dtype)
    out = ebc(kjt)
    assert out.shape == (batch, 4 + 8 + 8 + 3)
    torch.testing.assert_close(out, _expected(ebc, kjt))


@pytest.mark.parametrize("mixed_pooling", [None, "last", "middle"])
def test_pooled_parts_concatenate_to_the_output(mixed_pooling):
    """One part per pooling group in column order (two groups with "last"), one permuted tensor when
    the groups' columns interleave ("middle"); the parts' gradients reach the tables like the output's."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(_tables(mixed_pooling))
    kjt = _random_kjt(ebc, 9, torch.Generator().manual_seed(3))
    parts = ebc.pooled_parts(kjt)
    assert [p.shape[1] for p in parts] == {None: [23], "last": [20, 3], "middle": [23]}[mixed_pooling]
    assert torch.equal(torch.cat(parts, dim=1), ebc(kjt))
    up = torch.randn(9, 23)
    (torch.cat(parts, dim=1) * up).sum().backward()
    via_parts = [p.grad.clone() for p in ebc.parameters()]
    ebc.zero_grad()
    (ebc(kjt) * up).sum().backward()
    for got, want in zip(via_parts, [p.grad for p in ebc.parameters()]):
        assert torch.equal(got, want) and bool(want.abs().sum() > 0)


def test_per_sample_weights_and_empty_bags():
    torch.manual_seed(1)
    ebc = EmbeddingBagCollection(_tables())
    kjt = _random_kjt(ebc, 9, torch.Generator().manual_seed(3), weighted=True, max_len=2)
    assert bool((kjt.lengths() == 0).any())  # some bags are empty: they pool to zeros
    out = ebc(kjt)
    torch.testing.assert_close(out, _expected(ebc, kjt))
    empty = (kjt["user_id"]["lengths"] == 0)
    assert bool((out[empty][:, ebc.feature_slice("user_id")] == 0).all())


def test_gradients_match_per_feature_embedding_bag():
    torch.manual_seed(2)
    ebc = EmbeddingBagCollection(_tables(mixed_pooling="middle"))
    kjt = _random_kjt(ebc, 13, torch.Generator().manual_seed(4))
    upstream = torch.randn(13, ebc.total_dim)
    (ebc(kjt) * upstream).sum().backward()
    # the same gradient from per-feature EmbeddingBags sharing one leaf per table
    leaves = {t.name: ebc.embedding_bags[t.name].weight.detach().clone().requires_grad_() for t in ebc.tables}
    columns = []
    for table in ebc.tables:
        for feature in table.feature_names:
            jagged = kjt[feature]
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(jagged["lengths"], 0)[:-1]])
            columns.append(nn.functional.embedding_bag(jagged["values"], leaves[table.name], offsets,
                                                       mode=table.pooling))
    (torch.cat(columns, dim=1) * upstream).sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(ebc.embedding_bags[name].weight.grad, leaf.grad)


def test_key_order_extra_keys_and_torchrec_duck_type():
    torch.manual_seed(3)
    ebc = EmbeddingBagCollection(_tables())
    generator = torch.Generator().manual_seed(5)
    keys = ["genres", "other", "item_id", "user_id", "last_item"]
    kjt = _random_kjt(ebc, 6, generator, keys=keys)
    out = ebc(kjt)
    torch.testing.assert_close(out, _expected(ebc, kjt))

    class TorchrecLike:  # what ebc reads of torchrec's KeyedJaggedTensor
        def keys(self): return kjt.keys()
        def values(self): return kjt.values()
        def lengths(self): return kjt.lengths()
        def offsets(self): return kjt.offsets()
        def weights_or_none(self): return None

    torch.testing.assert_close(ebc(TorchrecLike()), out)


def test_feature_slices_split_and_state_dict_keys():
    ebc = EmbeddingBagCollection(_tables())
    assert ebc.feature_names == ["user_id", "item_id", "last_item", "genres"]
    assert ebc.feature_slice("item_id") == slice(4, 12)
    assert ebc.feature_slice("last_item") == slice(12, 20)
    assert ebc.feature_slice("genres") == slice(20, 23)
    kjt = _random_kjt(ebc, 4, torch.Generator().manual_seed(6))
    out = ebc(kjt)
    parts = ebc.split(out)
    assert list(parts) == ebc.feature_names
    torch.testing.assert_close(parts["genres"], out[:, 20:23])
    assert list(ebc.state_dict()) == [
        "embedding_bags.users.weight", "embedding_bags.items.weight", "embedding_bags.genres.weight"]
    other = EmbeddingBagCollection(_tables())
    other.load_state_dict(ebc.state_dict())
    torch.testing.assert_close(other(kjt), out)
    with pytest.raises(KeyError, match="unknown feature"):
        ebc.feature_slice("nope")


def test_empty_batch():
    ebc = EmbeddingBagCollection(_tables())
    kjt = KeyedJaggedTensor(ebc.feature_names, torch.zeros(0, dtype=torch.long),
                            lengths=torch.zeros(0, dtype=torch.long))
    assert ebc(kjt).shape == (0, ebc.total_dim)


def test_errors():
    with pytest.raises(ValueError, match="unique"):
        EmbeddingBagCollection([EmbeddingBagConfig("a", 3, 2, ["x"]), EmbeddingBagConfig("b", 3, 2, ["x"])])
    with pytest.raises(ValueError, match="unique"):
        EmbeddingBagCollection([EmbeddingBagConfig("a", 3, 2, ["x"]), EmbeddingBagConfig("a", 3, 2, ["y"])])
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingBagConfig("a", 3, 2, ["x"], pooling="max")
    with pytest.raises(ValueError, match="num_embeddings"):
        EmbeddingBagConfig("a", 0, 2, ["x"])
    with pytest.raises(ValueError, match="feature_names"):
        EmbeddingBagConfig("a", 3, 2, [])
    with pytest.raises(ValueError, match="optimizer kind"):
        EmbeddingBagCollection(_tables(), optimizer={"kind": "adam", "lr": 0.1})
    ebc = EmbeddingBagCollection(_tables(mixed_pooling="last"))
    generator = torch.Generator().manual_seed(7)
    with pytest.raises(ValueError, match="missing"):
        ebc(_random_kjt(ebc, 3, generator, keys=["user_id", "item_id"]))
    with pytest.raises(ValueError, match="pooling='sum'"):
        ebc(_random_kjt(ebc, 3, generator, weighted=True))
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        ebc({"user_id": torch.tensor([1])})
    kjt = KeyedJaggedTensor(ebc.feature_names, torch.tensor([11, 1, 0, 2]), lengths=torch.ones(4, dtype=torch.long))
    with pytest.raises(IndexError):
        ebc(kjt)  # 11 is out of range for the 11-row users table


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
def test_fused_optimizer_updates_touched_rows(kind):
    torch.manual_seed(4)
    lr, eps = 0.5, 1e-8
    ebc = EmbeddingBagCollection(_tables(), optimizer={"kind": kind, "lr": lr, "eps": eps})
    assert all(not p.requires_grad for p in ebc.parameters())
    kjt = _random_kjt(ebc, 8, torch.Generator().manual_seed(8), max_len=2)
    # the expected update, by hand on dense copies: the dense gradient then SGD / row-wise Adagrad
    plain = EmbeddingBagCollection(_tables())
    plain.load_state_dict({k: v for k, v in ebc.state_dict().items() if k.endswith("weight")})
    upstream = torch.randn(8, ebc.total_dim)
    (plain(kjt) * upstream).sum().backward()
    before = {n: t.weight.detach().clone() for n, t in ebc.embedding_bags.items()}
    out = ebc(kjt)
    assert out.requires_grad
    (out * upstream).sum().backward()
    for name, table in ebc.embedding_bags.items():
        assert table.weight.grad is None
        grad = plain.embedding_bags[name].weight.grad
        if kind == "sgd":
            expected = before[name] - lr * grad
        else:
            accumulator = grad.pow(2).mean(dim=1)
            expected = before[name] - lr * grad / (accumulator.sqrt() + eps).unsqueeze(1)
            torch.testing.assert_close(table.momentum, accumulator)
        touched = grad.abs().sum(dim=1) > 0
        assert bool(touched.any())
        torch.testing.assert_close(table.weight.detach(), expected)
        assert torch.equal(table.weight[~touched], before[name][~touched])  # untouched rows unchanged


def test_fused_rowwise_adagrad_state_dict_resumes():
    torch.manual_seed(5)
    config = {"kind": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8}
    ebc = EmbeddingBagCollection(_tables(), optimizer=config)
    assert list(ebc.state_dict()) == [
        "embedding_bags.users.weight", "embedding_bags.users.momentum",
        "embedding_bags.items.weight", "embedding_bags.items.momentum",
        "embedding_bags.genres.weight", "embedding_bags.genres.momentum"]
    generator = torch.Generator().manual_seed(9)
    first, second = (_random_kjt(ebc, 5, generator) for _ in range(2))
    ebc(first).sum().backward()
    resumed = EmbeddingBagCollection(_tables(), optimizer=config)
    resumed.load_state_dict(ebc.state_dict())
    assert float(resumed.embedding_bags["items"].momentum.abs().sum()) > 0
    ebc(second).square().sum().backward()
    resumed(second).square().sum().backward()
    for key, value in ebc.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_fused_optimizer_follows_module_conversion():
    torch.manual_seed(6)
    ebc = EmbeddingBagCollection(_tables(), optimizer={"kind": "rowwise_adagrad", "lr": 0.1})
    kjt = _random_kjt(ebc, 5, torch.Generator().manual_seed(10))
    ebc(kjt).sum().backward()
    momentum = ebc.embedding_bags["items"].momentum.clone()
    ebc.fused_optimizers[0].lr = 0.05  # a schedule step
    ebc.to(torch.float64)  # replaces every tensor: the optimizer is rebound to the new ones
    assert ebc.embedding_bags["items"].weight.dtype == torch.float64
    assert ebc.fused_optimizers[0].lr == 0.05
    torch.testing.assert_close(ebc.embedding_bags["items"].momentum, momentum)
    assert ebc.embedding_bags["items"].momentum.dtype == torch.float32
    ebc(kjt).sum().backward()
    assert ebc.fused_optimizers[0].weights[1] is ebc.embedding_bags["items"].weight
    assert ebc.fused_optimizers[0].accumulators[1] is ebc.embedding_bags["items"].momentum
    assert float((ebc.embedding_bags["items"].momentum - momentum).abs().sum()) > 0


@pytest.mark.parametrize("optimizer", [None, {"kind": "sgd", "lr": 0.5}])
def test_freeze_stops_training_the_tables(optimizer):
    torch.manual_seed(7)
    ebc = EmbeddingBagCollection(_tables(), optimizer=optimizer)
    kjt = _random_kjt(ebc, 6, torch.Generator().manual_seed(11))
    before = {n: t.weight.detach().clone() for n, t in ebc.embedding_bags.items()}
    assert ebc.freeze() is ebc and ebc.frozen
    out = ebc(kjt)
    assert not out.requires_grad  # nothing to train: no backward through the lookup at all
    assert all(torch.equal(t.weight, before[n]) for n, t in ebc.embedding_bags.items())
    ebc.freeze(False)
    (ebc(kjt) * torch.randn(6, ebc.total_dim)).sum().backward()
    if optimizer is None:
        assert all(t.weight.grad is not None for t in ebc.embedding_bags.values())
    else:
        assert not all(torch.equal(t.weight, before[n]) for n, t in ebc.embedding_bags.items())


def test_keyed_jagged_tensor_rejects_negative_lengths_and_bad_offsets():
    values = torch.tensor([3, 4, 5])
    # lengths [2, -1, 2] sum to 3 = len(values): only the sign check catches it.
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        KeyedJaggedTensor(["a"], values, lengths=torch.tensor([2, -1, 2]))
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        KeyedJaggedTensor(["a"], values, offsets=torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        KeyedJaggedTensor(["a"], values, offsets=torch.tensor([1, 2, 3]))
    ok = KeyedJaggedTensor(["a"], values, offsets=torch.tensor([0, 2, 2, 3]))
    assert ok.lengths().tolist() == [2, 0, 1]


def test_keyed_jagged_tensor_rejects_lengths_and_offsets_that_disagree():
    values = torch.tensor([3, 4, 5])
    # both given (as from_torchrec and id dropout pass them): the lookup reads offsets for some feature
    # selections and lengths for others, so a disagreement would pool different bags silently
    with pytest.raises(ValueError, match=r"offsets and lengths disagree at bag 0: lengths\[0\]=2"):
        KeyedJaggedTensor(["a"], values, lengths=torch.tensor([2, 0, 1]), offsets=torch.tensor([0, 1, 2, 3]))
    # decreasing offsets with lengths beside them (each offset checked only through lengths before)
    with pytest.raises(ValueError, match="offsets and lengths disagree at bag 1"):
        KeyedJaggedTensor(["a"], values, lengths=torch.tensor([1, 1, 1]), offsets=torch.tensor([0, 1, 0, 3]))
    # int32 lengths beside int64 offsets that agree are fine
    ok = KeyedJaggedTensor(["a"], values, lengths=torch.tensor([2, 0, 1], dtype=torch.int32),
                           offsets=torch.tensor([0, 2, 2, 3]))
    assert ok.lengths().tolist() == [2, 0, 1] and ok.offsets().tolist() == [0, 2, 2, 3]
    assert ok["a"]["values"].tolist() == [3, 4, 5]


def test_keyed_jagged_tensor_unknown_key_is_a_key_error_naming_the_keys():
    kjt = KeyedJaggedTensor(["user_id", "item_id"], torch.tensor([3, 4]), lengths=torch.tensor([1, 1]))
    assert kjt["item_id"]["values"].tolist() == [4]
    # it was ValueError("'age' is not in list"), e.g. a cold-start prior over a feature the batch lacks
    with pytest.raises(KeyError, match=r"'age' is not a key of this KeyedJaggedTensor; keys: \['user_id', 'item_id'\]"):
        kjt["age"]
