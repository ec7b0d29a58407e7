#!/usr/bin/env bash
# The test command: installs what it needs, then runs the pytest suite through the simulator.
# Extra arguments go to pytest (e.g. `-m slow` for the heavy cases CI skips by default).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup.sh || exit 1
# Build once, before the test workers start (each would otherwise find no build and compile the same sources).
python3 scripts/build_variant.py >/dev/null || exit 1
# One worker per core: the simulator runs a launch on one thread. Tests that compile shaders on first use share one
# worker (xdist_group "runtime_shaders"), so no shader is compiled twice at once.
python3 -m pytest -q -n auto --dist loadgroup -m "not slow" "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
