#!/usr/bin/env bash
# Issue 16's GPU measurements in one device call: install the carried wheels the accelerator image lacks
# (ml-collections and its PyYAML, for Python 3.12), then run every accelerator measurement; the JSON and a log
# land in $OUT (benchmarks/results/ without it).
#   here, once:  bash benchmarks/gpu_run.sh --download      # writes wheels/ (git-ignored)
#   there:       run tool, carry ["wheels"], timeout_s 560:  bash benchmarks/gpu_run.sh
#   CPU check:   SIZE=cpu_small bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--download" ]]; then
  pip download ml-collections pyyaml --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --implementation cp -d wheels
  exit 0
fi
if ! python -c "import ml_collections" 2>/dev/null; then
  pip install --no-deps --no-index wheels/*.whl
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python benchmarks/accelerator.py --size "${SIZE:-gpu}" 2>&1 | tee "$out/accelerator.log"
