"""ProductKeyMemory: the product-key top-k is exact, the output starts at zero, recording and gradients work."""

import pytest
import torch
import torch.nn.functional as F

from smf_lib.memory import ProductKeyMemory, ReadGradients


def exhaustive_topk(memory: ProductKeyMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every one of the n_keys**2 slots, s1[i] + s2[j] for slot i*n_keys + j, and take the top-k."""
    half = memory.key_dim // 2
    q = memory.query(x).view(len(x), memory.heads, 2, half)
    keys = memory.keys
    if memory.qk_norm:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (tokens, heads, n_keys**2)
    return full.topk(memory.topk, dim=-1)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,n_keys,topk,key_dim", [(1, 16, 4, 8), (4, 32, 8, 16), (3, 24, 24, 32)])
def test_lookup_equals_exhaustive_topk(qk_norm, heads, n_keys, topk, key_dim):
    torch.manual_seed(heads * 100 + n_keys + topk)
    memory = ProductKeyMemory(48, n_keys=n_keys, heads=heads, topk=topk, key_dim=key_dim, qk_norm=qk_norm).double()
    x = torch.randn(64, 48, dtype=torch.float64)
    with torch.no_grad():
        scores, indices = memory.lookup(x)
        want_scores, want_indices = exhaustive_topk(memory, x)
    assert scores.shape == indices.shape == (64, heads, topk)
    assert torch.all(indices >= 0) and torch.all(indices < n_keys**2)
    torch.testing.assert_close(scores, want_scores)
    assert torch.all(scores[..., :-1] >= scores[..., 1:]), "scores must come in descending order"
    for got_row, want_row in zip(indices.reshape(-1, topk).tolist(), want_indices.reshape(-1, topk).tolist()):
        assert set(got_row) == set(want_row)
    # each returned index's score is the exhaustive score of that slot
    q = memory.query(x).view(64, heads, 2, key_dim // 2)
    keys = memory.keys
    if qk_norm:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[0])
    s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[1])
    recomputed = s1.gather(-1, indices // n_keys) + s2.gather(-1, indices % n_keys)
    torch.testing.assert_close(scores, recomputed.detach())


def test_output_is_zero_with_zero_values():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    out = memory(torch.randn(3, 5, 32))
    assert out.shape == (3, 5, 32)
    assert torch.count_nonzero(out) == 0
    with torch.no_grad():
        memory.values.weight.normal_()
    assert torch.count_nonzero(memory(torch.randn(3, 5, 32))) > 0


def test_recording_shapes_and_weights():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=4, topk=6, key_dim=16)
    memory(torch.randn(2, 7, 32))
    assert memory.last_access is None, "nothing is recorded unless recording is on"
    memory.recording = True
    memory(torch.randn(2, 7, 32))
    access = memory.last_access
    assert access.indices.shape == access.weights.shape == (2, 7, 4, 6)
    torch.testing.assert_close(access.weights.sum(-1), torch.ones(2, 7, 4))
    assert torch.all(access.weights >= 0)
    assert not access.weights.requires_grad
    assert access.indices.max() < memory.n_slots == 256


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="key_dim must be even"):
        ProductKeyMemory(32, key_dim=15)
    with pytest.raises(ValueError, match="topk=20 needs 1 <= topk <= n_keys=16"):
        ProductKeyMemory(32, n_keys=16, topk=20, key_dim=16)
    with pytest.raises(ValueError, match="topk=0"):
        ProductKeyMemory(32, n_keys=16, topk=0, key_dim=16)
    with pytest.raises(ValueError, match="heads must be >= 1"):
        ProductKeyMemory(32, n_keys=16, topk=4, key_dim=16, heads=0)


def test_gradient_reaches_values_only_at_read_slots():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    memory.recording = True
    out = memory(torch.randn(2, 3, 32))
    (out * torch.randn_like(out)).sum().backward()  # values start at zero: the gradient flows through gate and proj
    grad = memory.values.weight.grad
    assert grad is not None and torch.count_nonzero(grad) > 0
    touched = set(memory.last_access.indices.flatten().tolist())
    rows_with_grad = set(torch.nonzero(grad.abs().sum(-1)).flatten().tolist())
    assert rows_with_grad <= touched


def test_factored_value_gradient_equals_the_dense_one():
    """Kept as reads, the table's gradient forms the same rows as the dense `.grad` (rows never read: zero), sums
    over several backwards, and leaves the gradient reaching the layer's input unchanged."""
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    torch.nn.init.normal_(memory.values.weight)  # non-zero values: the softmax weights get a gradient too
    inputs = [torch.randn(2, 5, 32, requires_grad=True) for _ in range(2)]
    upstream = [torch.randn(2, 5, 32) for _ in range(2)]
    for x, g in zip(inputs, upstream):
        (memory(x) * g).sum().backward()
    dense, dense_inputs = memory.values.weight.grad.clone(), [x.grad.clone() for x in inputs]
    memory.values.weight.grad = None
    memory.read_gradients = ReadGradients()
    for x, g in zip(inputs, upstream):
        x.grad = None
        (memory(x) * g).sum().backward()
    assert memory.values.weight.grad is None
    rows = torch.tensor([255, 3, 0, 17, 100, 42])
    assert torch.allclose(memory.read_gradients.rows(rows), dense[rows], atol=1e-6)
    assert torch.count_nonzero(memory.read_gradients.rows(torch.arange(256))) == torch.count_nonzero(dense)
    for x, expected in zip(inputs, dense_inputs):
        assert torch.allclose(x.grad, expected, atol=1e-6)


def test_written_mask_keeps_only_those_tokens_reads_in_the_value_gradient():
    """With `written` set, a row's gradient sums only the reads of the marked tokens: the dense gradient of the loss
    with the other tokens' outputs cut off; the gradient reaching the input still comes from every token."""
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    torch.nn.init.normal_(memory.values.weight)
    x, g = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32)
    written = torch.rand(2, 5) < 0.4
    (memory(x) * g * written[..., None]).sum().backward()
    dense = memory.values.weight.grad.clone()
    memory.values.weight.grad, x.grad = None, None
    (memory(x) * g).sum().backward()
    every_read, full_input_grad = memory.values.weight.grad.clone(), x.grad.clone()
    memory.values.weight.grad, x.grad = None, None
    memory.read_gradients = ReadGradients()
    memory.read_gradients.written = written.reshape(-1)
    (memory(x) * g).sum().backward()
    rows = torch.arange(256)
    assert torch.allclose(memory.read_gradients.rows(rows), dense, atol=1e-6)
    assert 0 < torch.count_nonzero(dense.any(dim=1)) < torch.count_nonzero(every_read.any(dim=1))
    assert torch.allclose(x.grad, full_input_grad, atol=1e-6)


def test_row_dropout_reads_dropped_rows_as_empty_in_training_only():
    """With row dropout a training forward reads each dropped row as if it held nothing (its weight is not given to
    the other rows) and gives it no gradient; a forward without gradients reads every row as it is."""
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    torch.nn.init.normal_(memory.values.weight)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        whole = memory(x)
    kept = torch.rand(memory.n_slots, generator=torch.Generator().manual_seed(1)) >= 0.5  # the draw the layer makes
    emptied = ProductKeyMemory(32, n_keys=16, heads=2, topk=4, key_dim=16)
    emptied.load_state_dict(memory.state_dict())
    with torch.no_grad():
        emptied.values.weight[~kept] = 0
        expected = emptied(x)
    memory.read_gradients, memory.row_dropout = ReadGradients(), (0.5, torch.Generator().manual_seed(1))
    out = memory(x)
    assert torch.allclose(out, expected, atol=1e-6) and not torch.allclose(out, whole, atol=1e-3)
    out.sum().backward()
    grads = memory.read_gradients.rows(torch.arange(memory.n_slots)).abs().sum(dim=1)
    assert grads[~kept].sum() == 0 and grads[kept].sum() > 0
    with torch.no_grad():
        assert torch.equal(memory(x), whole)
