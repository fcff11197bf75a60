"""Notebooks are committed clean: no outputs, no execution counts, no saved widget state."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in metadata.widgets"
    for number, cell in enumerate(nb.cells, start=1):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}, cell {number}: has outputs"
            assert cell.execution_count is None, f"{path.name}, cell {number}: has an execution count"
        assert "widgets" not in cell.metadata, f"{path.name}, cell {number}: saved widget state"
