#!/usr/bin/env bash
# Creates .venv (if missing) and installs lomas-jupyter with its lab and test extras, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[lab,test,bench]"
