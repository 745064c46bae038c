#!/usr/bin/env bash
# Install kdistill with its development tools into .venv, then lint, type-check and run every test.
source "$(dirname "$0")/setup.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy src
.venv/bin/pytest -q "$@"
