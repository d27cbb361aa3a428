#!/usr/bin/env bash
# Set up (a .venv in the repository, pip, pinned versions) and run the main job: the
# retrain-to-engine flow on the bundled digits example, with the embedded defaults
# (ephemeral Prefect API, directory registry file://artifacts/registry).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[pipeline]'
exec .venv/bin/trtforge run examples/digits/spec.yaml "$@"
