#!/usr/bin/env bash
# One command: install, load the penguins demo, and open JupyterLab on the quickstart notebook.
# The DP service runs embedded in this JupyterLab; its store and data live in ./.lomas (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOMAS_STORAGE_DIR="${LOMAS_STORAGE_DIR:-$PWD/.lomas}"
.venv/bin/lomas-admin demo
extra=()
if [ "$(id -u)" = "0" ]; then extra+=(--allow-root); fi
# Rooted at the repository (README, notebooks/admin.ipynb and the rest in reach), opening the quickstart.
exec .venv/bin/jupyter lab --ServerApp.root_dir="$PWD" --LabApp.default_url=/lab/tree/notebooks/quickstart.ipynb \
  --ServerApp.ip=127.0.0.1 "${extra[@]}" "$@"
