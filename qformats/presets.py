"""Named presets: the OCP MX formats, NVFP4, and the operating points of the three papers.

Adding a format is adding a line here; the spec derives everything else. Plain data (name ->
canonical string): :mod:`qformats.spec` parses it into ``qformats.PRESETS``.
"""

PRESET_SPECS = {
    # OCP MX v1.0 (E8M0 scale, block 32)
    "mxfp8_e4m3": "fp8_e4m3/b32/e8m0",
    "mxfp8_e5m2": "fp8_e5m2/b32/e8m0",
    "mxfp6_e3m2": "fp6_e3m2/b32/e8m0",
    "mxfp6_e2m3": "fp6_e2m3/b32/e8m0",
    "mxfp4": "fp4_e2m1/b32/e8m0",
    "mxint8": "int8/b32/e8m0",
    # NVIDIA NVFP4: e2m1 elements, e4m3 scale per 16, fp32 per-tensor scale
    "nvfp4": "fp4_e2m1/b16/e4m3+ts",
    # Verma et al. (arXiv 2411.09510): FP3/FP4/FP5, INT3/INT4/INT5, blocks 32 and 64
    "fp3_b32": "fp3_e1m1/b32/e8m0",
    "fp3_b64": "fp3_e1m1/b64/e8m0",
    "fp4_b32": "fp4_e2m1/b32/e8m0",
    "fp4_b64": "fp4_e2m1/b64/e8m0",
    "fp5_b32": "fp5_e2m2/b32/e8m0",
    "fp5_b64": "fp5_e2m2/b64/e8m0",
    "int3_b32": "int3/b32/e8m0",
    "int3_b64": "int3/b64/e8m0",
    "int4_b32": "int4/b32/e8m0",
    "int4_b64": "int4/b64/e8m0",
    "int5_b32": "int5/b32/e8m0",
    "int5_b64": "int5/b64/e8m0",
    # Flash Communication (Li et al., arXiv 2412.04964): asymmetric, block 128
    "flash_int4": "uint4/b128/fp16+zp",
    "flash_int6": "uint6/b128/fp16+zp",
    "flash_int8": "uint8/b128/fp16+zp",
    # Block-local Walsh-Hadamard rotation (+h32) before quantising (issue 16): the error of one
    # outlier is spread over its run of 32 instead of flattening the rest of the block
    "mxfp4_h32": "fp4_e2m1/b32/e8m0+h32",
    "int4_b32_bf16_h32": "int4/b32/bf16+h32",
}
