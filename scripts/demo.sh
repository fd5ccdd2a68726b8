#!/usr/bin/env bash
# One command: install, load the penguins demo, and open JupyterLab on the quickstart notebook.
# The DP service runs embedded in this JupyterLab; its store and data live in ./.lomas (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOMAS_STORAGE_DIR="${LOMAS_STORAGE_DIR:-$PWD/.lomas}"
.venv/bin/lomas-admin demo
# Your working copies of the notebooks (made once, never overwritten): running and saving them, and the notebooks
# you create beside them, leave the checkout clean (workspace/ is git-ignored). Delete a copy to get it afresh.
mkdir -p workspace
for nb in notebooks/*.ipynb; do
  [ -e "workspace/$(basename "$nb")" ] || cp "$nb" workspace/
done
extra=()
if [ "$(id -u)" = "0" ]; then extra+=(--allow-root); fi
# Rooted at the repository (the README in reach), opening the quickstart's working copy; the file browser starts
# in workspace/, so a new notebook lands there. JupyterLab's news prompt is off: it would cover the outputs.
exec .venv/bin/jupyter lab --ServerApp.root_dir="$PWD" --LabApp.default_url=/lab/tree/workspace/quickstart.ipynb \
  --ServerApp.ip=127.0.0.1 --LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate \
  "${extra[@]}" "$@"
