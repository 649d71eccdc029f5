#!/usr/bin/env bash
# Fetch, here where pip reaches the package registry, the wheels the GPU machine lacks, so
# that bench/gpu_check.sh can run there (it reaches no registry). Run once, before the first
# device call; the wheels land in .wheels/ (ignored by git through .git/info/exclude) and
# travel with the call that names it in `carry` (docs/performance.md, "Running the GPU check").
#
#   bash bench/gpu_wheels.sh
#
# The GPU machine's image has Python 3.12 with torch (CUDA), transformers, accelerate, peft,
# huggingface_hub, safetensors, networkx, xxhash, fsspec, rich, matplotlib, scikit-image,
# numpy, pillow, pyyaml and packaging. It lacks what is fetched below: diffusers, pydantic,
# zarr and their own needs. Versions are the ones CI tests (pyproject's test extra) or that
# this machine's .venv runs; pydantic_core must be the one this pydantic pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=.wheels
mkdir -p "$WHEELS"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$WHEELS/" "$EXCLUDE" 2>/dev/null || echo "/$WHEELS/" >>"$EXCLUDE"

PACKAGES=(
    diffusers==0.42.1 importlib_metadata==10.2.0
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing_extensions==4.16.0
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    tomli_w==1.2.0
)
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$platform")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$WHEELS" "${PACKAGES[@]}"
ls "$WHEELS"
du -sh "$WHEELS"
