#!/usr/bin/env bash
# Fresh-machine setup: Debian's Fashion-MNIST, a venv in .venv with the full stack, cmexp editable
# (its dev extras include diffusers, for the format=diffusers export and its test).
# Idempotent; about 2-3 minutes on first run (torch 2.14.1 + torchvision 0.29.1 CUDA builds run on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import cmexp, torch, torchvision, lightning, hydra, lpips, torch_fidelity, wandb, diffusers; print('cmexp', cmexp.__version__, 'torch', torch.__version__)"
