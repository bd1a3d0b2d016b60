#!/usr/bin/env bash
# One-time setup on a fresh machine (Python >= 3.10, no GPU needed): system libraries for offscreen
# MuJoCo rendering, a virtual environment in .venv, CPU PyTorch, and actprior with its extras.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Offscreen rendering for the MuJoCo simulators (EGL or OSMesa). Debian/Ubuntu names; on other systems
# install the equivalents of libegl1, libgl1 and libosmesa6 yourself, or run without images.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s libegl1 libgl1 libosmesa6 >/dev/null 2>&1; then
    echo "[setup] installing libegl1 libgl1 libosmesa6 (offscreen rendering)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1 libosmesa6 >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# CPU torch first: anything that pulls torch later is then satisfied and won't fetch a CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
echo "[setup] installing actprior[sim,dev]"
.venv/bin/pip install -q --disable-pip-version-check -e ".[sim,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import modeling_actprior, torch, transformers; print(f'[setup] ok: actprior {modeling_actprior.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
