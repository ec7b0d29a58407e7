#!/usr/bin/env bash
# The test command: installs what it needs, then runs the pytest suite through the simulator.
# Extra arguments go to pytest (e.g. `-m slow` for the heavy cases CI skips by default).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup.sh || exit 1
# Build first (every core: a shader's two twins compile in parallel, the biggest shader first), then test with one
# pytest-xdist worker per core. The simulator runs a launch on one thread, so the workers scale; torch's intra-op
# threads would oversubscribe the cores (OpenMP spin-waits): one per worker. Warm suite on 2 cores: 440 s in one
# process, 332 s with 2 workers and torch's default threads, 266 s with 2 workers of one thread each.
python3 scripts/build_variant.py >/dev/null || exit 1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m pytest -q -n auto --dist worksteal -m "not slow" "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
