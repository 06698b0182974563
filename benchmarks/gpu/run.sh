#!/usr/bin/env bash
# The whole full suite on a GPU host in one call: `bash benchmarks/gpu/run.sh` (see README.md here).
# Expects .whl/ (wheels) and .devmodel/minilm/ (MiniLM's config and tokenizer) in the working
# directory, and a host that has python3 with torch. Results go to $OUT (default: $OUT of the
# device tool, else benchmarks/results/gpu). The suite writes its JSON and Markdown after every
# benchmark and every training case, so a call cut off by a time limit keeps what it measured.
set -o pipefail
OUT=${OUT:-benchmarks/results/gpu}
LIMIT_S=${LIMIT_S:-540}  # under the device tool's 600 s per call, with the install and the model
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu/random_weights.py .devmodel/minilm || exit 5
export DYNFT_BENCH_MODEL=$PWD/.devmodel/minilm
# SIGINT first (the harness's children stop cleanly), SIGKILL 20 s later; the files written so far stay.
timeout -s INT -k 20 "$LIMIT_S" python3 -m benchmarks --suite full --device cuda --compile --out "$OUT" 2>&1 | tee "$OUT/full-cuda.log"
code=$?
ls -l "$OUT"
exit $code
