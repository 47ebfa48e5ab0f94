#!/usr/bin/env bash
# The wheels a GPU machine without network needs for `make gpu-check-offline`, into .whl/ (git-ignored):
# what streamd and the trainer import that the NVIDIA image (Python 3.12, PyTorch, onnxruntime, OpenCV, numpy,
# PyYAML, typer, rich, prometheus-client, safetensors, tqdm) lacks. Run here, where PyPI is reachable; carry .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# Pinned to what the test suite here runs with (pip freeze of the project's venv), pure-Python ones included.
PACKAGES=(
  av==18.1.0 pyzmq==27.3.0 pydantic==2.14.4 pydantic-core annotated-types typing-inspection
  jsonschema==4.26.0 jsonschema-specifications referencing rpds-py
  pixeltable-yolox==0.4.3 loguru thop pycocotools defusedxml
)
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
