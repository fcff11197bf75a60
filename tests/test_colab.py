"""The notebooks on Colab: a setup cell that is safe to run twice, settings a reader can edit, one repository URL.

The setup cell (each notebook's first code cell) runs here as IPython would run it, with its shell magics
(`!git clone`, `%pip install`) turned into calls of a recorder and a stand-in `google.colab` module in `sys.modules`.
"""

import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest
from IPython.core.inputtransformer2 import TransformerManager

import smf_lib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
COLAB = smf_lib.REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def cells(path, kind):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == kind]


def setup_cell(path):
    return cells(path, "code")[0]


def badge_link(path):
    return f"{COLAB}/blob/main/notebooks/{path.name}"


class Shell:
    """Stands in for `get_ipython()`: records `!git clone` and `%pip install`; a clone leaves a checkout folder
    (with its pyproject.toml) and an editable install makes `smf_lib` importable again."""

    def __init__(self, namespace, on_install):
        self.namespace, self.on_install = namespace, on_install
        self.clones, self.installs, self.editable = [], [], []

    def _args(self, line):
        return shlex.split(line.format_map(self.namespace))  # `{name}` as IPython expands it from the namespace

    def system(self, line):
        args = self._args(line)
        assert args[:2] == ["git", "clone"], f"unexpected shell command {line!r}"
        positional = [a for a in args[2:] if not a.startswith("-")]
        url = positional[0]
        target = Path(positional[1] if len(positional) > 1 else url.rstrip("/").rsplit("/")[-1])
        self.clones.append(url)
        target.mkdir(parents=True)
        (target / "pyproject.toml").write_text('[project]\nname = "smf_lib"\n')

    def run_line_magic(self, name, line):
        assert name == "pip", f"unexpected magic %{name} {line}"
        args = self._args(line)
        assert args[0] == "install", line
        self.installs.append(args[1:])
        if "-e" in args:
            self.editable.append((Path.cwd() / args[-1]).resolve())
            self.on_install()


class Colab:
    """Runs a setup cell as in a Colab kernel: each `run()` is one execution in the same kernel namespace."""

    def __init__(self, source, monkeypatch, importable):
        self.code = compile(TransformerManager().transform_cell(source), "<setup cell>", "exec")
        self.namespace = {"__name__": "__main__"}
        real = sys.modules["smf_lib"]
        if not importable:  # `None` in sys.modules: `import smf_lib` fails and find_spec says it is not there
            monkeypatch.setitem(sys.modules, "smf_lib", None)
        self.shell = Shell(self.namespace, on_install=lambda: sys.modules.__setitem__("smf_lib", real))
        self.namespace["get_ipython"] = lambda: self.shell
        monkeypatch.setitem(sys.modules, "google.colab", ModuleType("google.colab"))
        monkeypatch.setattr(sys, "path", list(sys.path))

    def run(self):
        exec(self.code, self.namespace)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_does_nothing_where_smf_lib_is_importable(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    colab = Colab(setup_cell(path), monkeypatch, importable=True)
    colab.run()
    colab.run()
    assert colab.shell.clones == [] and colab.shell.installs == []
    assert Path.cwd() == tmp_path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_clones_and_installs_once(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    colab = Colab(setup_cell(path), monkeypatch, importable=False)
    colab.run()
    checkout = Path.cwd()
    assert colab.shell.clones == [smf_lib.REPOSITORY]
    assert checkout.parent == tmp_path and (checkout / "pyproject.toml").is_file()
    assert colab.shell.editable == [checkout]
    calls = (list(colab.shell.clones), list(colab.shell.installs))
    colab.run()  # the same kernel, the cell run again
    assert (colab.shell.clones, colab.shell.installs) == calls, "the second run cloned or installed again"
    assert Path.cwd() == checkout, "the second run changed directory"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_uses_an_existing_checkout(path, tmp_path, monkeypatch):
    """Opened inside a checkout (here: its notebooks/ folder) that is not installed: install it, clone nothing, and
    go to the root it found by its pyproject.toml, whatever the folder is called."""
    checkout = tmp_path / "my-copy"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "smf_lib"\n')
    monkeypatch.chdir(checkout / "notebooks")
    colab = Colab(setup_cell(path), monkeypatch, importable=False)
    for _ in range(2):
        colab.run()
        assert colab.shell.clones == []
        assert colab.shell.editable == [checkout]
        assert Path.cwd() == checkout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_does_nothing_outside_colab(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    shell = Shell({}, on_install=lambda: None)
    exec(TransformerManager().transform_cell(setup_cell(path)), {"get_ipython": lambda: shell})
    assert shell.clones == [] and shell.installs == [] and Path.cwd() == tmp_path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_uses_the_one_repository_url(path):
    setup = setup_cell(path)
    assert setup.count(smf_lib.REPOSITORY) == 1, "the setup cell should spell the repository URL once"
    assert re.search(rf'^REPOSITORY = "{re.escape(smf_lib.REPOSITORY)}"', setup, re.M)
    assert "{REPOSITORY}" in setup, "the clone should use REPOSITORY"
    assert f"[![Open In Colab]({BADGE})]({badge_link(path)})" in cells(path, "markdown")[0], "no badge in cell 1"
    text = path.read_text(encoding="utf-8")
    for url in re.findall(r"https?://[^\s\"')\]]*smf[-_]lib[^\s\"')\]]*", text):
        assert url.startswith((smf_lib.REPOSITORY, COLAB)), f"{url} is not under {smf_lib.REPOSITORY}"


def test_readme_badges_use_the_one_repository_url():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"[![Open In Colab]({BADGE})]({badge_link(path)})" in readme, f"no badge for {path.name}"
    for url in re.findall(r"https?://[^\s\"')\]]*smf[-_]lib[^\s\"')\]]*", readme):
        assert url.startswith((smf_lib.REPOSITORY, COLAB)), f"{url} is not under {smf_lib.REPOSITORY}"


def settings_cell(path):
    return next(source for source in cells(path, "code") if "notebook_settings(" in source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_settings_cell_profile_and_fast_are_editable(path, tmp_path, monkeypatch):
    """PROFILE and FAST default to SMF_PROFILE and SMF_FAST, and an edited value wins over the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMF_PROFILE", "tiny")
    monkeypatch.setenv("SMF_FAST", "1")
    source = settings_cell(path)
    namespace = {}
    exec(source, namespace)
    assert (namespace["PROFILE"], namespace["FAST"]) == ("tiny", True)
    assert namespace["S"].profile.name == "tiny" and namespace["S"].fast
    edited, count = re.subn(r'^PROFILE = .*$', 'PROFILE = "cpu"', source, count=1, flags=re.M)
    edited, count_fast = re.subn(r"^FAST = .*$", "FAST = False", edited, count=1, flags=re.M)
    assert count == count_fast == 1
    namespace = {}
    exec(edited, namespace)
    assert namespace["S"].profile.name == "cpu" and not namespace["S"].fast


@pytest.mark.parametrize("where", ["notebooks", "notebooks/deeper", "."])
@pytest.mark.parametrize("notebook, saved", [("04_measuring_forgetting.ipynb", "tiny"),
                                             ("05_continual_learning.ipynb", "stream-tiny")])
def test_notebooks_find_saved_results_from_the_project_root(notebook, saved, where, tmp_path, monkeypatch):
    project = tmp_path / "checkout"
    summary = project / "results" / saved / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    (project / "pyproject.toml").write_text('[project]\nname = "smf_lib"\n')
    (project / where).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(project / where)
    monkeypatch.setenv("SMF_PROFILE", "tiny")
    monkeypatch.setenv("SMF_FAST", "1")
    namespace = {}
    exec(settings_cell(ROOT / "notebooks" / notebook), namespace)
    assert namespace["ROOT"] == project and namespace["SAVED"] == summary
