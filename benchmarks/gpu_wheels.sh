#!/usr/bin/env bash
# What a GPU machine without network needs for `make gpu-check-offline`, both git-ignored:
# - .whl/: the wheels of what streamd and the trainer import that the NVIDIA image (Python 3.12, PyTorch,
#   onnxruntime, OpenCV, numpy, PyYAML, typer, rich, prometheus-client, safetensors, tqdm) lacks;
# - .gpu-data/BCCD: the BCCD test split's images and lists, for the gpu-marked parity tests (../shared, where
#   the dataset lives, does not travel with the checkout).
# Run here, where PyPI is reachable; carry .whl and .gpu-data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# Pinned to what the test suite here runs with (pip freeze of the project's venv), pure-Python ones included; an
# unpinned name takes the venv's version.
PACKAGES=(
  av==18.1.0 pyzmq==27.3.0 pydantic==2.14.4 pydantic-core annotated-types typing-inspection
  jsonschema==4.26.0 jsonschema-specifications referencing rpds-py
  pixeltable-yolox==0.4.3 loguru thop pycocotools defusedxml
  typing-extensions pytest-timeout
)
# typing-extensions: pydantic 2.14 needs >= 4.16, newer than the image's; pytest-timeout: gpu_check's per-test timeout.
resolved=()
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}
  if [[ $spec == *==* ]]; then resolved+=("$spec"); continue; fi
  version=$(.venv/bin/pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  resolved+=("$name${version:+==$version}")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $(printf -- '--platform %s ' "${PLATFORMS[@]}") -d .whl "${resolved[@]}"
du -sh .whl
BCCD=${BCCD:-../shared/datasets/BCCD}
if [[ -f $BCCD/ImageSets/Main/test.txt ]]; then
  mkdir -p .gpu-data/BCCD/ImageSets/Main .gpu-data/BCCD/JPEGImages
  cp "$BCCD"/ImageSets/Main/{train,val,test}.txt .gpu-data/BCCD/ImageSets/Main/
  while read -r name; do cp "$BCCD/JPEGImages/$name.jpg" .gpu-data/BCCD/JPEGImages/; done < "$BCCD/ImageSets/Main/test.txt"
  du -sh .gpu-data
else
  echo "no BCCD at $BCCD: the gpu-marked parity tests will skip there" >&2
fi
