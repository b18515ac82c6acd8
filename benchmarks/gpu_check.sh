#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine from the repo root; $OUT collects logs):
# the test suite (CUDA tests included) and the throughput table for small and paper-scale presets.
# GPU_CHECK=bench skips the suite (for a rerun that only needs the figures).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/platform${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site; fi
nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[ "${GPU_CHECK:-all}" = bench ] || python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -15
# Eager and compiled side by side (MFU, compile seconds), the base64 ensemble of eDiff-I's three
# experts sampled with guidance at 25 steps, peak memory with activation checkpointing.
B="python3 benchmarks/bench_model.py --device cuda --dtype bfloat16 --peak-tflops 989 --repeats 5"
{
  $B --presets tiny demo --batch 64 --compile
  $B --presets base64 --batch 32 --compile --experts 3 --steps 25
  $B --presets base64 --batch 32 --compile --compile-mode reduce-overhead --experts 3 --steps 25
  $B --presets base64 --batch 32 --activation-checkpointing --steps 4
  $B --presets sr256 --batch 8 --compile
  $B --presets sr256 --batch 8 --activation-checkpointing --steps 4
  $B --presets sr1024 --batch 1 --steps 8
} 2>&1 | tee "$OUT/bench.log"
