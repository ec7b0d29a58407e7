#!/usr/bin/env bash
# Installs what the simulator, the demo and the tests need on a fresh Debian/Linux x86_64 machine:
# clang-19 (Debian package) and the pinned Python dependencies. Idempotent and quick when done before.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang-19 compiles the shaders for the simulator; shellcheck checks the scripts (scripts/mac_check.sh among them).
if ! command -v clang++-19 >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1; then
  echo "setup: installing clang-19 and shellcheck (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-19 shellcheck >/dev/null
fi

PY=${PYTHON:-python3}
if ! $PY -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)"
  # torch first and on its own, so no resolver ever pulls a newer (CUDA) build
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0
fi
if ! $PY - <<'PYCHECK' 2>/dev/null
import sys
from importlib.metadata import version
pins = [l.split("#")[0].strip() for l in open("requirements.txt")]
sys.exit(any(p and version(p.split("==")[0]).split("+")[0] != p.split("==")[1] for p in pins))
PYCHECK
then
  echo "setup: installing pinned Python dependencies"
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements.txt
fi
# MLX's Metal headers (the mlx-metal wheel) for the simulator's third-party anchors: fetched into build/third_party/,
# never committed.
$PY scripts/fetch_mlx_metal.py >/dev/null
