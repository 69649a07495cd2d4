#!/usr/bin/env bash
# Create .venv (if missing) and install torch + requirements.txt into it. Idempotent.
#   --test       also install the test-only packages of requirements-test.txt (test.sh passes it)
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0, the CPU build available offline here;
#                on a GPU machine use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124")
#   VENV         virtual environment folder (default: .venv in the project)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=requirements.txt
if [ "${1:-}" = "--test" ]; then
    REQUIREMENTS=requirements-test.txt
elif [ $# -gt 0 ]; then
    echo "usage: bash scripts/install.sh [--test]" >&2
    exit 2
fi
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
fi
"$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
"$VENV/bin/python" -c "import torch, pytorch_lightning, monai; print(f'installed: torch {torch.__version__}, lightning {pytorch_lightning.__version__}, monai {monai.__version__}')"
