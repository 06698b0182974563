#!/usr/bin/env bash
# The full suite on a GPU host that has torch but not dynft's other requirements (see README.md here).
# Expects .whl/ (wheels) and .devmodel/minilm/ (MiniLM's config and tokenizer) in the working directory.
set -o pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu/random_weights.py .devmodel/minilm || exit 5
export DYNFT_BENCH_MODEL=$PWD/.devmodel/minilm
# One phase per call keeps each under the device tool's limits; each writes its own JSON.
for only in training swap serving; do
    timeout 420 python3 -m benchmarks --suite full --device cuda --only $only --compile --out "$OUT/$only" 2>&1 | tee "$OUT/$only.log"
done
