"""Declare a block format, encode a tensor into one wire buffer, decode it, and read what the
spec derives (bits per value, compression, error bound). Runs in a second on a CPU.

    python examples/formats.py
"""
import torch

import qformats

fmt = qformats.Format.parse("fp4_e2m1/b32/e8m0")    # = the preset "mxfp4" (OCP MX)
x = torch.randn(8, 4096)
q = qformats.encode(x, fmt)                          # q.data: one uint8 wire buffer
y = qformats.decode(q)
print(fmt.bits_per_value, fmt.compression_ratio)     # 4.25, 3.76

assert fmt == qformats.as_format("mxfp4") and str(fmt) == "fp4_e2m1/b32/e8m0"
assert q.data.dtype == torch.uint8 and q.data.numel() == fmt.nbytes(x.shape)
print(f"{fmt}: {x.numel() * 2} bf16 bytes -> {q.data.numel()} wire bytes, "
      f"max relative error {((y - x).abs().max() / x.abs().max()).item():.3f} "
      f"(bound per block: {fmt.relative_error_bound:.3f} of the block's absmax)")
for spec in ("fp4_e2m1/b16/e4m3+ts", "uint4/b128/fp16+zp", "int4/b64/e8m0", "fp8_e4m3/b32/e8m0"):
    f = qformats.Format.parse(spec)
    print(f"{spec:<22} {f.bits_per_value:6.3f} bits/value, {f.compression_ratio:.2f}x smaller than bf16")
