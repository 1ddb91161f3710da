"""The wheel holds every package under its namespaced name, and nothing imports bare folder names."""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from pathlib import Path

import pytest

import logferry

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAPPING = PYPROJECT["tool"]["setuptools"]["package-dir"]


def on_disk_packages() -> set[str]:
    found = set()
    for name, folder in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert on_disk_packages() - listed == set(), "add these to [tool.setuptools] packages"


def test_every_listed_package_imports():
    for name in PYPROJECT["tool"]["setuptools"]["packages"]:
        importlib.import_module(name)


def test_no_bare_imports_of_the_mapped_folders():
    bare = re.compile(r"^\s*(from|import)\s+(collectors|processors|schemas)\b", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("logferry", "collectors", "processors", "schemas", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if bare.search(p.read_text())
    ]
    assert offenders == []


def test_namespaced_imports_resolve_to_the_mapped_folders():
    import logferry.collectors
    import logferry.processors
    import logferry.schemas

    if os.environ.get("LOGFERRY_EXPECT_INSTALLED"):
        # Run by .ci/wheel-check: the package must come from site-packages, not the checkout.
        assert "site-packages" in logferry.__file__
        assert ROOT not in Path(logferry.collectors.__file__).resolve().parents
    else:
        assert Path(logferry.collectors.__file__).parent == ROOT / "collectors"
        assert Path(logferry.processors.__file__).parent == ROOT / "processors"


def test_schema_file_ships_as_package_data():
    from logferry.schemas import schema_json

    assert schema_json()["name"] == "LogEntry"


@pytest.mark.parametrize("top", ["collectors", "processors"])
def test_bare_top_level_names_are_not_installed(top):
    # pytest runs in importlib mode, so the checkout root is not on sys.path: only what the
    # install provides can import, and that must not include the bare folder names.
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(top)
    assert logferry.__version__
