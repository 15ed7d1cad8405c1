#!/bin/sh
# Install qwen-serve with its pinned dependencies (docker/requirements.lock) into a fresh virtual environment.
# Both images run this, and tests/deploy runs the same steps outside a container, so the images cannot rot
# unnoticed. Usage: docker/install.sh VENV SOURCE_DIR
# Environment: TORCH_INDEX_URL (optional) is a package index to take torch from (e.g. PyTorch's CPU-only index);
# WITH_FLASH_ATTN=1 also builds flash-attn (CUDA image, needs nvcc).
set -eu
venv=$1
src=$2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade "pip==26.3"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    # torch alone from there; its dependencies come with the project from the default index
    "$venv/bin/pip" install --quiet --no-deps --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
fi
"$venv/bin/pip" install --quiet --constraint "$src/docker/requirements.lock" "$src"
if [ "${WITH_FLASH_ATTN:-0}" = 1 ]; then
    "$venv/bin/pip" install --quiet --no-build-isolation "flash-attn==2.8.3"
fi
"$venv/bin/qwen-serve" --version
