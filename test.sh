#!/usr/bin/env bash
# The test suite, set up the same way on any machine (the command CI runs):
#   bash test.sh              all tests (tiny models on CPU; about 2 minutes on 2 cores)
#   bash test.sh tests/test_data.py -k resume   arguments replace "tests" and go to pytest
# Packages: see scripts/env.sh (creates or reuses .venv when the imports are missing).
set -euo pipefail
cd "$(dirname "$0")"
WITH_DEV=1 source scripts/env.sh
python -m pytest -q "${@:-tests}"
