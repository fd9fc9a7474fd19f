#!/usr/bin/env bash
# One-GPU device session, in calls that each fit the 600 s limit; every log and table goes to $OUT.
#   usage: OUT=dir bash benchmarks/gpu_one.sh STAGE
#   STAGE: suite   the whole test suite (README's test command on a 1-GPU machine), log streamed
#          time    codec kernel times, 64 and 128 MiB, every format of codec_gpu.py (no checks, no peers)
#          check   codec bit-exactness at 64 MiB, every format, and the division check
#          norm    the RMSNorm epilogue: exactness and times (rmsnorm_gpu.py), the plugin's GPU tests
#          peers   the torchao peers (needs the torchao wheel carried in .whl/)
# Order for a session: time, check (issue 21), then suite (issue 24), then norm (issue 27).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python -c "import torch, triton; print('device', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/versions.txt"
case "${1:-}" in
  suite) timeout 560 python -m pytest -n 15 --timeout 200 -q -rfs tests 2>&1 | tee "$OUT/pytest_gpu.log" ;;
  time)  QF_BENCH_REP_MS=${QF_BENCH_REP_MS:-40} timeout 570 python benchmarks/codec_gpu.py --out "$OUT/codec_timing.jsonl" \
           --sizes 64,128 --no-check --no-peers 2>&1 | tee "$OUT/codec_timing.log" ;;
  check) timeout 570 python benchmarks/codec_gpu.py --out "$OUT/codec_checks.jsonl" --check-only --check-mib 64 2>&1 \
           | tee "$OUT/codec_checks.log" ;;
  norm)  timeout 400 python benchmarks/rmsnorm_gpu.py --out "$OUT/rmsnorm.jsonl" 2>&1 | tee "$OUT/rmsnorm.log"
         timeout 150 python -m pytest -q tests/tp/test_vllm_plugin.py -k "cuda_graph or fused_policy" 2>&1 \
           | tee "$OUT/vllm_plugin_gpu.log" ;;
  peers) pip install --no-deps .whl/torchao-*.whl >/dev/null 2>&1
         timeout 500 python benchmarks/codec_gpu.py --out "$OUT/codec_peers.jsonl" --sizes 128 --no-check \
           --formats mxfp8_e4m3,mxfp4 2>&1 | tee "$OUT/codec_peers.log" ;;
  *) echo "usage: OUT=dir bash benchmarks/gpu_one.sh {suite|time|check|norm|peers}" >&2; exit 2 ;;
esac
