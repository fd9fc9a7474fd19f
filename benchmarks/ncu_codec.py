"""One launch of each codec step for Nsight Compute (``ncu``): 256 MiB bf16 input, [rows, 8192].

    ncu --clock-control none --kernel-name regex:_codec_kernel --section SpeedOfLight \
        --section WarpStateStats --section LaunchStats --section Occupancy \
        --metrics smsp__inst_executed.sum python benchmarks/ncu_codec.py mxfp4 mxfp8_e4m3 ...

Launches, per format: quantize, dequantize, dequant_sum(2), dequant_sum_requant(2) (after a
warm-up run of each, which ncu filters out with --launch-skip when wanted).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lowering import launch as K  # noqa: E402
from lowering.constants import lower  # noqa: E402
import qformats  # noqa: E402

W = 8192
for fmt in sys.argv[1:]:
    rows = (256 << 20) // 2 // W
    x = torch.randn(rows, W, device="cuda", dtype=torch.bfloat16)
    kc = lower(fmt, W, "cuda")
    nb = qformats.Format.parse(fmt).nbytes((rows, W))
    buf = torch.empty(nb, dtype=torch.uint8, device="cuda")
    bufs = torch.empty(2, nb, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    K.quantize(x, kc, out=bufs[0])
    K.quantize(x * 2, kc, out=bufs[1])
    K.quantize(x, kc, out=buf)
    K.dequantize(buf.view(1, -1), kc, rows, W, torch.bfloat16, out=y)
    K.dequantize(bufs, kc, rows, W, torch.bfloat16, out=y)
    K.quantize(None, kc, shape=(rows, W), bufs=bufs, out=buf)
    torch.cuda.synchronize()
