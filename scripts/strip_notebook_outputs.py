"""Git's clean filter for notebooks: a notebook on stdin, the same notebook without outputs on stdout.

Installed by ``scripts/setup.sh --dev`` (``git config filter.nbstrip.clean ...``) and applied to
``notebooks/*.ipynb`` by ``.gitattributes``: a notebook run in JupyterLab keeps its outputs on disk,
while git stores (and ``git diff`` compares) it with every code cell's outputs and execution count
cleared and the saved widget state and per-cell run metadata dropped, which is what
``tests/test_notebooks.py`` asks of a committed notebook. A notebook without outputs passes through
byte for byte (nbformat's layout: sorted keys, one-space indent, a final newline). Standard library
only, so git can run it before any environment exists.
"""

from __future__ import annotations

import json
import sys

CELL_RUN_METADATA = ("execution", "scrolled", "collapsed", "ExecuteTime")  # what running a cell adds
NOTEBOOK_RUN_METADATA = ("widgets",)  # JupyterLab's saved widget state (large, and changes every run)


def strip(nb: dict) -> dict:
    """``nb`` (a parsed notebook) without outputs, execution counts and run metadata."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        for key in CELL_RUN_METADATA:
            meta.pop(key, None)
    for key in NOTEBOOK_RUN_METADATA:
        nb.get("metadata", {}).pop(key, None)
    return nb


def main() -> None:
    text = sys.stdin.buffer.read().decode("utf-8")
    if not text.strip():  # an empty file stays empty
        sys.stdout.write(text)
        return
    nb = strip(json.loads(text))
    sys.stdout.buffer.write((json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
