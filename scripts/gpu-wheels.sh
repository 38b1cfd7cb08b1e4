#!/usr/bin/env bash
# Download the wheels the device machine's image lacks into .whl/ (git-ignored), for
# bench/gpu.sh: the device call names .whl in `carry` and gpu.sh installs them with --no-deps
# beside the image's own CUDA torch. Versions are constraints.txt's pins; the image has
# Python 3.12 on x86-64 and the rest of what vaeft imports (torch, torchvision, numpy, scipy,
# huggingface-hub, safetensors, rich, pyyaml, pillow, ...).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# importlib_metadata (a diffusers requirement) is left out: diffusers imports it on Python < 3.8 only.
# typing_extensions: pydantic needs a newer one than the image may have.
PACKAGES=(diffusers lpips torch_fidelity pydantic pydantic_core annotated-types typing-inspection typing_extensions)
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt || true)
    [[ -n $pin ]] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
du -sh .whl
ls .whl
