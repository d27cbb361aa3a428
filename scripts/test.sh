#!/usr/bin/env bash
# Set up (a .venv in the repository, pip, pinned versions), lint, and run the whole test suite.
# pytest's own exit code stands: 5 (no tests collected) is a failure, since the suite always has tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
