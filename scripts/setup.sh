#!/usr/bin/env bash
# Creates .venv (if missing) and installs lomas-jupyter with its lab, test, bench and hub extras, editable;
# and configurable-http-proxy (npm) for the JupyterHub tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[lab,test,bench,hub]"
if command -v npm >/dev/null 2>&1; then
  if [ ! -x deploy/hub/node_modules/.bin/configurable-http-proxy ]; then
    npm ci --prefix deploy/hub --no-audit --no-fund --loglevel=error
  fi
else
  echo "note: npm is missing; the JupyterHub tests will be skipped (they need configurable-http-proxy)"
fi
