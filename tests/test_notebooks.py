"""The generated notebooks match scripts/make_notebooks.py, and no notebook carries outputs.

Executing the notebooks is CI's job: ``NICE_KIT_FAST=1 python -m pytest --nbmake notebooks/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


@pytest.mark.parametrize("name", sorted(GENERATOR.NOTEBOOKS))
def test_generated_notebook_is_up_to_date(name):
    path = NOTEBOOKS / name
    assert path.exists(), f"{path} is missing: run python scripts/make_notebooks.py"
    assert path.read_text(encoding="utf-8") == GENERATOR.render(name), (
        f"{name} differs from what scripts/make_notebooks.py writes: edit the script, not the notebook, "
        "then run python scripts/make_notebooks.py")


def test_generator_is_deterministic():
    for name in GENERATOR.NOTEBOOKS:
        assert GENERATOR.render(name) == GENERATOR.render(name)


def test_generated_notebooks_read_fast_mode():
    for name, cells in GENERATOR.NOTEBOOKS.items():
        source = "\n".join(text for kind, text in cells if kind == "code")
        assert "fast_mode()" in source, f"{name} does not read nice_kit.demo.fast_mode()"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


def test_readme_lists_every_notebook():
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    expected = set(GENERATOR.NOTEBOOKS) | {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    missing = [name for name in sorted(expected) if name.removesuffix(".ipynb") not in readme]
    assert not missing, f"notebooks/README.md does not mention {missing}"
