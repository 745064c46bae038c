# Sourced by demo.sh and test.sh: a virtual environment in .venv with kdistill installed.
# torch is pinned to 2.13.0 so pip takes the CPU build when one is on disk instead of
# resolving the newest (CUDA) wheels; kdistill's own torch range accepts it unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[${KDISTILL_EXTRAS:-dev}]"
# Datasets: $KDISTILL_DATA if set, else the shared folder beside the checkout when present,
# else kdistill's default (~/.cache/kdistill/data, downloaded on first use).
if [ -z "${KDISTILL_DATA:-}" ] && [ -d ../shared/data ]; then
  KDISTILL_DATA="$(cd ../shared/data && pwd)"
  export KDISTILL_DATA
fi
