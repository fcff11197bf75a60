"""The package as a user meets it: the public API, a light import, the README example, and modules that import
only what sits above them in the pipeline."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import smf_lib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "smf_lib"
# The pipeline, top to bottom: each module may import only modules listed before it.
ORDER = ["files", "timing", "hub", "losses", "models", "memory", "retrofit", "data", "augment", "stats", "calibration",
         "healing", "pipeline", "selection", "optim", "batches", "prefix", "packing", "training", "gates", "profiles",
         "evaluation", "analysis", "patches", "report", "experiment", "tuning", "plots", "ablation", "stream_report",
         "stream", "training_plots", "reads", "widgets", "figures", "workloads", "bench", "__main__"]


def test_public_api_names_exist():
    from smf_lib import MemoryConfig, retrofit  # noqa: F401 - the line a new user types first

    assert smf_lib.__version__
    assert all(hasattr(smf_lib, name) for name in smf_lib.__all__)
    for name in ("retrofit", "train", "load_memory"):
        assert "Example:" in getattr(smf_lib, name).__doc__, name


def test_import_stays_light():
    code = ("import sys, smf_lib; print(sorted(m for m in ('matplotlib', 'ipywidgets', 'smf_lib.bench', 'datasets', "
            "'peft') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def _imports(path: Path) -> set[str]:
    """The smf_lib modules a file imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smf_lib."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_imports_only_modules_above_it():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER), "place new modules in ORDER"
    for position, name in enumerate(ORDER):
        below = _imports(PACKAGE / f"{name}.py") - set(ORDER[:position])
        assert not below, f"{name} imports {sorted(below)}, which sit below it in the pipeline"


def test_modules_stay_short():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's first example, run as written except on the tiny profile."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it in your own code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'get_profile("cpu")' in code and "save_memory(" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('get_profile("cpu")', 'get_profile("tiny")'), "README.md", "exec"), {})
    loaded, _ = smf_lib.load_base_model("tiny")
    smf_lib.load_memory(loaded, tmp_path / "facts.memory.safetensors")
    assert len(smf_lib.memory_layers(loaded)) == 2


@pytest.mark.parametrize("name", ["retrofit", "train", "load_memory", "SparseMemoryOptimizer"])
def test_examples_use_public_names(name):
    doc = getattr(smf_lib, name).__doc__
    example = doc.split("Example:", 1)[1] if "Example:" in doc else ""
    called = set(re.findall(r"\b([a-z_]+)\(", example)) - {"print", "len", "lambda"}
    assert called <= set(smf_lib.__all__) | {"Trainer", "evaluate"}, called - set(smf_lib.__all__)


def test_atomic_writes_leave_a_normal_file(tmp_path):
    from smf_lib.files import write_json

    path = write_json(tmp_path / "x.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and path.stat().st_mode & 0o044  # readable by others, as usual
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
