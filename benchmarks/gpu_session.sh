#!/usr/bin/env bash
# One device call (2 GPUs): GPU bit-exactness of the kernels, the fused all-reduce and the
# compile pass, then the fused all-reduce kernel breakdown at 128 MiB. Logs go to $OUT.
#   usage: OUT=dir bash benchmarks/gpu_session.sh [breakdown tile configs "elems,warps" ...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python -c "import torch, triton; print('device', torch.cuda.get_device_name(), 'x', torch.cuda.device_count(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
SEL="gpu_large or fused or adversarial and (fp5 or nvfp4 or flash_int4) or ops_equal or fall_back or compile_full or codec"
echo "## pytest tests/lowering -k '$SEL'" | tee "$OUT/gpu_tests.log"
timeout 300 python -m pytest -q tests/lowering/test_kernels.py tests/lowering/test_ops.py -k "$SEL" 2>&1 | tail -n 30 | tee -a "$OUT/gpu_tests.log"
echo "## pytest tests/tp/comm/test_fused.py -k gpus; tests/tp/comm/test_compile.py -k gpu -m multigpu" | tee -a "$OUT/gpu_tests.log"
timeout 240 python -m pytest -q tests/tp/comm/test_fused.py -k gpus 2>&1 | tail -n 20 | tee -a "$OUT/gpu_tests.log"
timeout 240 python -m pytest -q tests/tp/comm/test_compile.py -k gpu -m multigpu 2>&1 | tail -n 20 | tee -a "$OUT/gpu_tests.log"
for cfg in "${@:-2048,4}"; do
  echo "## breakdown 128 MiB, tile $cfg" | tee -a "$OUT/breakdown.log"
  QFORMATS_TILE=$cfg timeout 200 torchrun --nproc-per-node 2 benchmarks/allreduce_gpu.py --breakdown-mib 128 \
    --fmts mxfp8_e4m3 mxfp4 int4/b32/bf16 uint4/b128/fp16+zp --out "$OUT/breakdown_${cfg/,/_}.jsonl" 2>&1 \
    | grep -v Warning | grep -v enable_symm_mem | tee -a "$OUT/breakdown.log"
done
