"""Row-sparse optimizers for value tables: only the rows they are given move, bit for bit."""

from __future__ import annotations

import torch


class RowSGD:
    """SGD without momentum on chosen rows (Lin et al.'s choice for sparse memory finetuning)."""

    def __init__(self, tables: list[torch.nn.Parameter], lr: float) -> None:
        self.tables, self.lr = tables, lr

    @torch.no_grad()
    def step(self, rows: list[torch.Tensor]) -> None:
        """Update `tables[j][rows[j]]` from their gradients; every other row stays exactly as it was."""
        for table, r in zip(self.tables, rows):
            if len(r):
                table[r] -= self.lr * table.grad[r]


class RowAdam:
    """Adam(W) with per-row state and per-row step counts, kept only for rows that were ever selected.

    A masked `torch.optim.Adam` is not sparse: momentum keeps moving a row after it is deselected and AdamW's
    weight decay moves every non-zero row. Here a row that is not in `rows` is not touched at all.
    """

    def __init__(self, tables: list[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.tables, self.lr, self.betas, self.eps, self.weight_decay = tables, lr, betas, eps, weight_decay
        self.state = [self._empty(t) for t in tables]

    @staticmethod
    def _empty(table: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"slot_of": torch.full((len(table),), -1, dtype=torch.long, device=table.device),
                "m": table.new_zeros(0, table.shape[1]), "v": table.new_zeros(0, table.shape[1]),
                "steps": table.new_zeros(0)}

    def state_rows(self) -> int:
        """How many rows hold optimizer state (the optimizer's memory is this times 2 x row size)."""
        return sum(len(s["steps"]) for s in self.state)

    @torch.no_grad()
    def step(self, rows: list[torch.Tensor]) -> None:
        """One Adam step on `tables[j][rows[j]]` only."""
        b1, b2 = self.betas
        for table, r, s in zip(self.tables, rows, self.state):
            if not len(r):
                continue
            new = r[s["slot_of"][r] < 0]
            if len(new):
                s["slot_of"][new] = torch.arange(len(s["steps"]), len(s["steps"]) + len(new), device=r.device)
                s["m"] = torch.cat([s["m"], table.new_zeros(len(new), table.shape[1])])
                s["v"] = torch.cat([s["v"], table.new_zeros(len(new), table.shape[1])])
                s["steps"] = torch.cat([s["steps"], table.new_zeros(len(new))])
            slot, g = s["slot_of"][r], table.grad[r]
            s["steps"][slot] += 1
            m = s["m"][slot].mul_(b1).add_(g, alpha=1 - b1)
            v = s["v"][slot].mul_(b2).addcmul_(g, g, value=1 - b2)
            s["m"][slot], s["v"][slot] = m, v
            steps = s["steps"][slot].unsqueeze(1)
            update = (m / (1 - b1**steps)) / ((v / (1 - b2**steps)).sqrt() + self.eps)
            if self.weight_decay:
                update += self.weight_decay * table[r]
            table[r] -= self.lr * update
