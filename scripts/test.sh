#!/usr/bin/env bash
# One command: install, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test drives Debian's chromium (never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Debian's chromium for the browser test..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: Debian's chromium is missing; the browser test will be skipped (CI fails instead)"
  fi
fi
# The store suite runs on PostgreSQL too: a throwaway cluster of Debian's server, started by the tests.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Debian's PostgreSQL server for the store tests..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    # the package starts a cluster of its own; the tests use theirs, so stop the package's
    if command -v pg_ctlcluster >/dev/null 2>&1; then
      for cluster in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do pg_ctlcluster ${cluster/\// } stop || true; done
    fi
  else
    echo "note: PostgreSQL's server is missing; the PostgreSQL tests will be skipped (CI fails instead)"
  fi
fi
# The Spark backend's tests start a standalone master and worker; Spark needs Java (Debian's, never downloaded).
if ! command -v java >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Debian's Java runtime for the Spark tests..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "note: Java is missing; the Spark tests will be skipped (CI fails instead)"
  fi
fi
.venv/bin/ruff check server_ext lomas_jupyter tests benchmarks  # the project's own sources, never a user's notebook
# the sidebar's data logic (vitest), with the jlpm that jupyterlab ships and the committed yarn.lock
(cd labextension && PATH="$PWD/../.venv/bin:$PATH" jlpm install --immutable >/dev/null && PATH="$PWD/../.venv/bin:$PATH" jlpm test)
.venv/bin/python -m pytest -q "$@"
