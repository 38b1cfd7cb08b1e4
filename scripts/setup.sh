#!/usr/bin/env bash
# Create .venv (Python 3.11) and install vaeft with the pinned constraints. Idempotent: the
# Makefile only calls this when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
LOG=.vaeft/install.log
mkdir -p .vaeft

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; vaeft needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

echo "setup: installing vaeft and its dependencies (pinned by constraints.txt; log: $LOG)"
# The constraints pin the CPU torch and the torchvision built for it; without them pip would
# replace torch with a CUDA build (several GB).
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -c constraints.txt -e '.[test]' >"$LOG" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -30 >&2
  echo "error: installation failed (full log: $LOG)" >&2
  exit 1
fi

# A CPU machine must never end up with CUDA wheels (VAEFT_ALLOW_CUDA=1 on GPU hosts).
if [ "${VAEFT_ALLOW_CUDA:-0}" != "1" ]; then
  cuda_pkgs=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(nvidia-|triton==)' || true)
  if [ -n "$cuda_pkgs" ]; then
    echo "error: CUDA packages were installed on a CPU setup:" >&2
    echo "$cuda_pkgs" >&2
    exit 1
  fi
fi

"$VENV/bin/dvc" config --local core.analytics false >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, vaeft; print(f'setup: ok (vaeft {vaeft.__version__}, torch {torch.__version__})')"
