"""The git filter that keeps notebook outputs out of commits (scripts/strip_notebook_outputs.py,
installed by ``scripts/setup.sh --dev``, applied by .gitattributes): a notebook run in JupyterLab
leaves the repository in a state tests/test_notebooks.py accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "strip_notebook_outputs.py"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _strip(data: bytes) -> bytes:
    return subprocess.run([sys.executable, str(SCRIPT)], input=data, capture_output=True, check=True).stdout


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "HOME": str(repo.parent), "PATH": _path()}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def _path() -> str:
    import os

    # the filter runs "python3": the interpreter of this test first on PATH
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _executed(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` as JupyterLab saves it after running: outputs, counts, timing and widget state."""
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"ran {i}\n"),
                        nbformat.v4.new_output("display_data", data={"text/html": "<b>x</b>"})]
        cell.execution_count = i + 1
        cell.metadata["execution"] = {"iopub.execute_input": "2026-12-03T16:00:00Z"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"a": {}}, "version_major": 2}}
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_clean_notebook_passes_through_byte_for_byte(path):
    assert _strip(path.read_bytes()) == path.read_bytes()


def test_outputs_are_stripped():
    nb = _executed(nbformat.read(NOTEBOOKS[0], as_version=4))
    out = nbformat.reads(_strip(nbformat.writes(nb).encode()).decode(), as_version=4)
    nbformat.validate(out)
    assert all(c.outputs == [] and c.execution_count is None and "execution" not in c.metadata
               for c in out.cells if c.cell_type == "code")
    assert "widgets" not in out.metadata
    assert [c.source for c in out.cells] == [c.source for c in nb.cells]


def test_setup_installs_a_filter_that_keeps_outputs_out_of_commits(tmp_path):
    block = re.search(r"# >>> nbstrip.*?# <<< nbstrip", (ROOT / "scripts" / "setup.sh").read_text(), re.S)
    assert block, "scripts/setup.sh has no nbstrip block"
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    shutil.copy(SCRIPT, repo / "scripts" / SCRIPT.name)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    name = "notebooks/05_inspecting_influence.ipynb"
    shutil.copy(ROOT / name, repo / name)
    _git(repo, "init", "-q")
    subprocess.run(["bash", "-c", block.group(0)], cwd=repo, check=True, env={"PATH": _path(), "HOME": str(tmp_path)})
    assert _git(repo, "config", "filter.nbstrip.clean").strip() == "python3 scripts/strip_notebook_outputs.py"
    assert _git(repo, "check-attr", "filter", name).strip().endswith("filter: nbstrip")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "clean")
    # run it in JupyterLab: outputs, counts, widget state on disk; git sees no change
    nb = _executed(nbformat.read(repo / name, as_version=4))
    nbformat.write(nb, repo / name)
    assert "outputs" in (repo / name).read_text() and '"execution_count": 1' in (repo / name).read_text()
    assert _git(repo, "diff") == ""  # (status may list it by its size until the index is refreshed:)
    _git(repo, "add", "-u")
    assert _git(repo, "status", "--porcelain") == ""  # staged, it is the committed notebook
    # edit a cell too, then commit: the commit holds the edit and no output
    nb.cells[0].source += "\n\nAn added line."
    nbformat.write(nb, repo / name)
    _git(repo, "commit", "-qam", "edit")
    committed = nbformat.reads(_git(repo, "show", f"HEAD:{name}"), as_version=4)
    nbformat.validate(committed)
    assert committed.cells[0].source.endswith("An added line.")
    dirty = [i for i, c in enumerate(committed.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty and "widgets" not in committed.metadata
    assert "ran 0" in (repo / name).read_text()  # the working copy keeps what the user saw
