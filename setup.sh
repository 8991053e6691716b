#!/usr/bin/env bash
# One command that sets pvm-dreamer up on a fresh Debian/Ubuntu machine: system libraries for headless
# rendering, then a virtual environment in .venv with everything the agent and its tests need.
#   bash setup.sh            # then: .venv/bin/python -m pytest -q
# PYTHON=python3.11 bash setup.sh picks the interpreter (MetaDrive 0.4.3 needs Python < 3.12).
set -euo pipefail
cd "$(dirname "$0")"

# Headless OpenGL: EGL (MuJoCo's default here, MUJOCO_GL=egl) and OSMesa (MUJOCO_GL=osmesa, the fallback),
# plus the GL libraries MetaDrive's renderer links against.
PKGS="libegl1 libgl1 libgles2 libosmesa6 libglib2.0-0"
if command -v apt-get >/dev/null 2>&1; then
  missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
else
  echo "setup.sh: no apt-get; install EGL or OSMesa (libegl1 / libosmesa6 equivalents) yourself" >&2
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# On a machine with a GPU, install your CUDA build of torch into .venv first; pip keeps it if it matches.
.venv/bin/python -m pip install -q -r requirements.txt
# Ray, for sweep.py only (the agent never imports it); ~25 s more here, so the sweep test runs in CI too.
.venv/bin/python -m pip install -q -r requirements-sweep.txt
.venv/bin/python -c "import torch, mujoco, transformers, gymnasium; print('pvm-dreamer ready: torch', torch.__version__)"
