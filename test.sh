#!/usr/bin/env bash
# Install everything (the test-only packages of requirements-test.txt too) and run the test suite:
#   bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh --test
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
