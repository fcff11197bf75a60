"""Row-sparse optimizers: unselected rows stay bit-identical, and RowAdam is AdamW with per-row step counts."""

import itertools

import pytest
import torch

from smf_lib.optim import RowAdam, RowSGD

SHAPES = [(12, 5), (9, 3)]  # two tables of different sizes and widths


def _tables(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype)) for shape in SHAPES]


def _schedule(n_steps, seed):
    """Per step, one random set of rows per table; consecutive steps differ and rows get dropped later on."""
    gen = torch.Generator().manual_seed(seed)
    sched = [[torch.randperm(n, generator=gen)[:n // 3].sort().values for n, _ in SHAPES] for _ in range(n_steps)]
    sched[3][1] = torch.zeros(0, dtype=torch.long)  # a step where one table has nothing selected
    for j in range(len(SHAPES)):
        sets = [set(step[j].tolist()) for step in sched]
        assert all(a != b for a, b in itertools.pairwise(sets))
        assert any(sets[k] - set().union(*sets[k + 1:]) for k in range(n_steps - 1))  # some rows never come back
    return sched


def check_unselected_rows_untouched(make_step, n_steps=8, seed=0):
    """Raise AssertionError (naming the step) if a step moves any row it was not given, or leaves a chosen row."""
    tables = _tables(seed)
    step = make_step(tables)
    gen = torch.Generator().manual_seed(seed + 1)
    for k, rows in enumerate(_schedule(n_steps, seed + 2)):
        for t in tables:
            t.grad = torch.randn(t.shape, generator=gen)  # gradient on every row, selected or not
        before = [t.detach().clone() for t in tables]
        step(rows)
        for j, (t, b, r) in enumerate(zip(tables, before, rows)):
            keep = torch.ones(len(t), dtype=torch.bool)
            keep[r] = False
            assert torch.equal(t[keep], b[keep]), f"step {k}: table {j} moved unselected rows"
            assert (t[r] != b[r]).all(), f"step {k}: table {j} left a selected row unchanged"


def _masked(opt_cls, **kwargs):
    """A standard torch optimizer on the whole table with the gradient zeroed outside the selected rows."""
    def make_step(tables):
        opt = opt_cls(tables, lr=1e-2, **kwargs)

        def step(rows):
            for t, r in zip(tables, rows):
                mask = torch.zeros(len(t), 1)
                mask[r] = 1.0
                t.grad *= mask
            opt.step()
        return step
    return make_step


@pytest.mark.parametrize("weight_decay, layer_scale", [(0.0, False), (0.1, False), (0.0, True)])
def test_row_adam_leaves_unselected_rows_bit_identical(weight_decay, layer_scale):
    """Guards RowAdam against moving any row that is not selected at the current step."""
    check_unselected_rows_untouched(
        lambda tables: RowAdam(tables, lr=1e-2, weight_decay=weight_decay, layer_scale=layer_scale).step)


def test_layer_scale_moves_a_barely_read_row_in_proportion_to_its_gradient():
    """Row-wise Adam moves a row with a 1000 times smaller gradient as far as the others on its first step; with one
    second moment per table it moves it 1000 times less, and no coordinate moves by more than lr."""
    moves = {}
    for layer_scale in (False, True):
        table = torch.nn.Parameter(torch.zeros(3, 4))
        table.grad = torch.tensor([[1.0] * 4, [0.5] * 4, [1e-3] * 4])
        RowAdam([table], lr=0.1, layer_scale=layer_scale).step([torch.tensor([0, 1, 2])])
        moves[layer_scale] = table.detach().abs().amax(dim=1)
    torch.testing.assert_close(moves[False], torch.full((3,), 0.1))
    assert moves[True].max() <= 0.1 and moves[True][0] == 0.1
    torch.testing.assert_close(moves[True][2] / moves[True][1], torch.tensor(2e-3))


def test_row_sgd_leaves_unselected_rows_bit_identical():
    """Guards RowSGD against moving any row that is not selected at the current step."""
    check_unselected_rows_untouched(lambda tables: RowSGD(tables, lr=1e-2).step)


def test_checker_catches_masked_adamw_weight_decay_leak():
    """The checker must reject masked AdamW: decoupled weight decay moves every non-zero row at the first step."""
    with pytest.raises(AssertionError, match="step 0: table 0 moved unselected rows"):
        check_unselected_rows_untouched(_masked(torch.optim.AdamW, weight_decay=0.1))


def test_checker_catches_masked_adam_momentum_leak():
    """The checker must reject masked Adam (no decay): momentum moves rows after they are deselected."""
    with pytest.raises(AssertionError, match="step 1: table 0 moved unselected rows"):
        check_unselected_rows_untouched(_masked(torch.optim.Adam))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_row_adam_on_all_rows_matches_torch_adamw(weight_decay):
    """Guards RowAdam's update rule (bias correction, eps, decoupled decay) against torch.optim.AdamW."""
    ours, ref = _tables(3, torch.float64), _tables(3, torch.float64)
    opt = RowAdam(ours, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step([torch.arange(len(t)) for t in ours])
        ref_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_row_adam_interleaved_rows_match_per_row_adamw(weight_decay):
    """Guards per-row step counts: each row follows its own AdamW fed only the steps where it was selected."""
    (table,) = ours = [_tables(5, torch.float64)[0]]
    init = table.detach().clone()
    singles = [torch.nn.Parameter(init[i:i + 1].clone()) for i in range(len(table))]
    opt = RowAdam(ours, lr=1e-2, weight_decay=weight_decay)
    ref_opts = [torch.optim.AdamW([p], lr=1e-2, weight_decay=weight_decay) for p in singles]
    gen = torch.Generator().manual_seed(6)
    counts = torch.zeros(len(table), dtype=torch.long)
    for k in range(15):
        rows = torch.tensor([i for i in range(len(table) - 1) if (k + i) % (2 + i % 3) == 0])  # last row: never
        table.grad = torch.randn(table.shape, generator=gen, dtype=torch.float64)
        opt.step([rows])
        for i in rows.tolist():
            singles[i].grad = table.grad[i:i + 1].clone()
            ref_opts[i].step()
        counts[rows] += 1
        torch.testing.assert_close(table.detach(), torch.cat([p.detach() for p in singles]), rtol=1e-12, atol=1e-14)
    assert len(set(counts[:-1].tolist())) > 1 and counts[-1] == 0  # rows really had different step counts
    assert torch.equal(table[-1], init[-1])


def test_row_adam_keeps_state_only_for_rows_ever_selected():
    """Guards the memory claim: optimizer state grows with distinct rows ever selected, not with table size."""
    tables = _tables(7)
    opt = RowAdam(tables, lr=1e-2)
    assert opt.state_rows() == 0
    seen = [set(), set()]
    for rows in ([[0, 3], [1]], [[3, 5], []], [[0, 3, 5], [1]], [[2], [4, 8]]):
        for t in tables:
            t.grad = torch.ones_like(t)
        opt.step([torch.tensor(r, dtype=torch.long) for r in rows])
        for s, r in zip(seen, rows):
            s.update(r)
        assert opt.state_rows() == sum(len(s) for s in seen)
    assert opt.state_rows() == 7 < sum(len(t) for t in tables)
