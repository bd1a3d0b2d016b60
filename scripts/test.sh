#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: CPU only, a few minutes. Slow simulator tests: add `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
exec .venv/bin/python -m pytest "$@"
