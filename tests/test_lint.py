"""The code base is pyflakes-clean, and nothing in the repository cites files outside it."""

from __future__ import annotations

import io
from pathlib import Path

import pyflakes.api as pyflakes_api  # installed by `scripts/setup.sh --dev`
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nice_kit", "widgets", "bench", "scripts", "tests")


def test_python_sources_are_pyflakes_clean():
    out = io.StringIO()
    n = pyflakes_api.checkRecursive([str(ROOT / p) for p in PACKAGES], Reporter(out, out))
    assert n == 0, out.getvalue()


def test_nothing_cites_files_outside_the_repository():
    paths = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "nice_kit").rglob("*.py"),
             *(ROOT / "widgets").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "configs").glob("*.toml")]
    cited = [str(p.relative_to(ROOT)) for p in paths
             if any(s in p.read_text(encoding="utf-8") for s in ("../shared", "shared/NICE", "NICE.md"))]
    assert not cited, f"these cite a file outside the repository (copy the fact into docs/method.md): {cited}"
