"""Each notebook's source of truth is its jupytext percent file ``notebooks/NN_name.py``.

The ``.ipynb`` beside it is what Jupyter opens and CI executes; it must hold exactly the cells of
its ``.py`` (same types, same sources) and no outputs. After editing a ``.py``, sync its notebook:

    jupytext --sync notebooks/NN_name.py

Executing the notebooks is CI's job: ``NICE_KIT_FAST=1 python -m pytest --nbmake notebooks/``.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
IPYNB = sorted(NOTEBOOKS.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
PAIRING = "ipynb,py:percent"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    assert IPYNB, f"no notebooks found in {NOTEBOOKS}"
    notebooks = {p.stem for p in IPYNB}
    sources = {p.stem for p in SOURCES}
    assert not notebooks - sources, f"notebooks without a percent source (.py): {sorted(notebooks - sources)}"
    assert not sources - notebooks, (
        f"percent sources without a notebook: {sorted(sources - notebooks)}; "
        "create it with jupytext --sync notebooks/<name>.py")


@pytest.mark.parametrize("path", IPYNB, ids=lambda p: p.name)
def test_notebook_matches_its_percent_source(path):
    source = path.with_suffix(".py")
    assert source.exists(), f"{path.name} has no percent source {source.name}"
    nb = nbformat.read(path, as_version=4)
    formats = nb.metadata.get("jupytext", {}).get("formats")
    assert formats == PAIRING, f"{path.name}: jupytext pairing is {formats!r}, expected {PAIRING!r}"
    from_source = jupytext.read(source)
    assert from_source.metadata.get("jupytext", {}).get("formats") == PAIRING, (
        f"{source.name}: its header does not pair it with the notebook ({PAIRING!r})")
    expected, actual = _cells(from_source), _cells(nb)
    first_diff = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
    assert actual == expected, (
        f"{path.name} differs from {source.name} (cells: {len(actual)} against {len(expected)}, first "
        f"difference at cell {first_diff}): edit the .py, then run jupytext --sync notebooks/{source.name}")


def _as_committed(path: Path):
    """The notebook as a commit stores it: through the output-stripping clean filter when this
    checkout has it installed (``scripts/setup.sh --dev``), so a notebook run in JupyterLab, outputs on
    disk, still passes; without the filter, as it is on disk."""
    import subprocess

    nb = nbformat.read(path, as_version=4)
    try:
        clean = subprocess.run(["git", "config", "--get", "filter.nbstrip.clean"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:  # no git
        clean = ""
    if clean:
        import importlib.util

        spec = importlib.util.spec_from_file_location("strip_notebook_outputs", ROOT / "scripts" /
                                                      "strip_notebook_outputs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        nb = nbformat.from_dict(module.strip(dict(nb)))
    return nb


@pytest.mark.parametrize("path", IPYNB, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = _as_committed(path)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_notebook_reads_fast_mode(path):
    code = "\n".join(source for kind, source in _cells(jupytext.read(path)) if kind == "code")
    assert "fast_mode()" in code, f"{path.name} does not read nice_kit.demo.fast_mode()"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_notebook_source_is_pyflakes_clean(path):
    import pyflakes.api as pyflakes_api  # installed by `scripts/setup.sh --dev`
    from pyflakes.reporter import Reporter

    class Collect:
        def __init__(self):
            self.lines: list[str] = []

        def write(self, text):
            self.lines.append(text)

        def flush(self):
            pass

    out = Collect()
    n = pyflakes_api.check(path.read_text(encoding="utf-8"), str(path), Reporter(out, out))
    assert n == 0, "".join(out.lines)


def test_notebooks_cite_only_files_in_the_repository():
    for path in [*SOURCES, NOTEBOOKS / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert "shared/" not in text and "NICE.md" not in text, (
            f"{path.name} cites a file outside the repository; cite docs/method.md instead")
    assert (ROOT / "docs" / "method.md").exists()


def test_readme_lists_every_notebook():
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    missing = [p.stem for p in IPYNB if p.stem not in readme]
    assert not missing, f"notebooks/README.md does not mention {missing}"
