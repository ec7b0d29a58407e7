#!/usr/bin/env bash
# The main job: installs what it needs, then runs the demo through the simulated shaders.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 demo.py
