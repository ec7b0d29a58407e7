#!/usr/bin/env bash
# The test command: installs what it needs, then runs the pytest suite through the simulator.
# Extra arguments go to pytest (e.g. `-m slow` for the heavy cases CI skips by default).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup.sh || exit 1
# Build first (every core: a shader's two twins compile in parallel, the biggest shader first), then test. One pytest
# process: pytest-xdist on 2 cores gained nothing measurable (472 s vs 463 s; torch's intra-op threads likely compete).
python3 scripts/build_variant.py >/dev/null || exit 1
python3 -m pytest -q -m "not slow" "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
