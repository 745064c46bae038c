#!/usr/bin/env bash
# Install kdistill with its development tools into .venv, then lint, type-check and run every test.
source "$(dirname "$0")/setup.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy src
# one worker per core; a file's tests stay on one worker (they share module fixtures)
.venv/bin/pytest -q -n auto --dist loadfile "$@"
