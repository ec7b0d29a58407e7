#!/usr/bin/env bash
# The one command for a person with an Apple Silicon Mac (macOS 26+, Xcode 26 with the Metal toolchain, Nix with
# flakes): everything our Linux CI cannot do, in one run, into one report file to share.
#
#   bash scripts/mac_check.sh            # writes mac_report/report.md (+ the logs and results next to it)
#   bash scripts/mac_check.sh --quick    # skips the long benchmarks (smoke configuration only)
#
# Steps (each is recorded; a failing step does not stop the later ones):
#   1. the machine: macOS, chip, Xcode, Metal toolchain, Nix
#   2. every shader in build.toml compiled alone with `xcrun metal -std=metal4.0 -O2` (kernel-builder's
#      flags), diagnostics with file:line
#   3. the kernel-builder build (`nix run .#build-and-copy`), which puts build/torch2XX-metal-aarch64-darwin/
#   4. the pytest suite on MPS, loading that build (data checks on)
#   5. benchmarks/run.py: times on MPS next to SDPA (and MLX if installed)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=mac_report
rm -rf "$OUT"
mkdir -p "$OUT/air"
REPORT="$OUT/report.md"
FAILED=()

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
# Runs a step, keeps its full log, and puts the status and the log's tail into the report.
step() {
  local name=$1 log="$OUT/$2.log"
  shift 2
  echo "mac_check: $name" >&2
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  section "$name"
  if [ "$rc" -eq 0 ]; then
    printf 'PASS (%ss) — full log: %s\n' "$((SECONDS - start))" "$log" >>"$REPORT"
  else
    printf 'FAIL, exit %s (%ss) — full log: %s\n' "$rc" "$((SECONDS - start))" "$log" >>"$REPORT"
    FAILED+=("$name")
  fi
  {
    printf '\n```\n'
    tail -n 60 "$log"
    printf '```\n'
  } >>"$REPORT"
  return "$rc"
}

machine() {
  sw_vers
  uname -m
  sysctl -n machdep.cpu.brand_string
  system_profiler SPDisplaysDataType 2>/dev/null | grep -E 'Chipset Model|Total Number of Cores|Metal' || true
  xcodebuild -version
  xcodebuild -showComponent MetalToolchain || echo "Metal toolchain component not reported (xcodebuild -downloadComponent MetalToolchain)"
  xcrun metal --version
  nix --version
  git rev-parse HEAD
  git status --short
  local major
  major=$(sw_vers -productVersion | cut -d. -f1)
  if [ "$major" -lt 26 ]; then
    echo "macOS $major: the metallib targets Metal 4.0, which needs macOS 26 or newer"
    return 1
  fi
}

# Every .metal file listed in build.toml, one `xcrun metal` each, as kernel-builder compiles them.
compile_shaders() {
  local shaders status=0
  shaders=$(python3 -c 'import tomllib; c = tomllib.load(open("build.toml", "rb")); print("\n".join(s for k in c["kernel"].values() for s in k["src"] if s.endswith(".metal")))')
  for shader in $shaders; do
    echo "== $shader"
    if xcrun metal -std=metal4.0 -O2 -Wall -c "$shader" -o "$OUT/air/$(basename "$shader" .metal).air"; then
      echo "ok"
    else
      status=1
    fi
  done
  return "$status"
}

kernel_builder() {
  nix run .#build-and-copy -L && ls -d build/torch*-metal-aarch64-darwin
}

python_env() {
  # A venv of its own: torch 2.13.0 (the macOS wheel has MPS) first, so no resolver picks another, then the pins.
  python3 -m venv "$OUT/venv" &&
    "$OUT/venv/bin/pip" install -q torch==2.13.0 &&
    "$OUT/venv/bin/pip" install -q -r requirements.txt &&
    "$OUT/venv/bin/python" -c 'import torch; assert torch.backends.mps.is_available(), "no MPS device"; print(torch.__version__)'
}

# tests/mslsim and test_scripts.py test the Linux simulator and the Linux tooling (x86-64 only): not the Mac's job.
pytest_on_mps() {
  METAL_FLASH_SDPA_CHECK_DATA=1 "$OUT/venv/bin/python" -m pytest -q -m "not slow" tests \
    --ignore=tests/mslsim --ignore=tests/test_scripts.py
}

benchmarks() {
  local args=(--out "$OUT/benchmarks")
  [ "$QUICK" -eq 1 ] && args+=(--smoke)
  "$OUT/venv/bin/python" benchmarks/run.py "${args[@]}"
}

printf '# metal-flash-sdpa: Mac check\n\n%s, commit %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(git rev-parse --short HEAD)" >"$REPORT"
step "Machine" machine machine
step "Shaders compiled with xcrun metal -std=metal4.0" shaders compile_shaders
step "kernel-builder build (nix run .#build-and-copy)" kernel_builder kernel_builder
if step "Python environment (torch 2.13.0 with MPS + requirements.txt)" python_env python_env; then
  step "pytest on MPS" pytest pytest_on_mps
  step "Benchmarks (benchmarks/run.py)" benchmarks benchmarks
fi

section "Summary"
if [ "${#FAILED[@]}" -eq 0 ]; then
  echo "All steps passed." >>"$REPORT"
else
  printf -- '- failed: %s\n' "${FAILED[@]}" >>"$REPORT"
fi
echo "mac_check: report in $REPORT (share that file; the logs and benchmark results are next to it)" >&2
[ "${#FAILED[@]}" -eq 0 ]
