"""GPU codec benchmark: kernel time in CUDA graphs beside the HBM copy, peers and bit-exactness
checks in the same run.

    python benchmarks/codec_gpu.py --out $OUT/codec.json [--quick] [--check-mib 64]

For each format and bf16 input of ``--sizes`` MiB ([rows, 8192]) it times, with
``triton.testing.do_bench_cudagraph`` (kernel time, no host launch cost):

* ``quantize``, ``dequantize`` (to bf16), ``dequant_sum`` of N = 2, 4, 8 buffers and
  ``dequant_sum_requant`` of N = 2, 4, 8 through the launchers of :mod:`lowering.kernels`
  (preallocated outputs: what the fused all-reduce does);
* the same through ``torch.ops.qformats`` inside a CUDA graph (what a caller of the ops gets);
* a device-to-device copy of the input (the HBM rate of this run): every figure is also given
  as the fraction (bytes read + bytes written) / time over the copy's rate;
* peers: torchao's ``to_mx`` under ``torch.compile`` (MXFP8, MXFP4), NVFP4 if it runs, its Triton
  ``triton_to_mxfp8_dim0`` if it imports, and ``torch.compile`` of our TorchCodec;

and in the same run checks bit-exactness of every kernel at ``--check-mib`` on random and
adversarial inputs against the reference (through ``lowering.torch_codec``, which the CPU
tests hold bitwise equal to ``qformats``; the oracle runs on the CPU), plus the GPU division
of zero-point scales against ``div_rn`` on every (bf16, bf16) pair and on random fp32 pairs
(absmax scales multiply by the block's rounded reciprocal since wire version 3: the exactness
checks cover them).
Writes one JSON record per measurement and prints a table.
"""
from __future__ import annotations

if __name__ == "__main__":  # before any import or file: it times CUDA kernels, nothing else
    import torch as _torch

    if not _torch.cuda.is_available():
        raise SystemExit("benchmarks/codec_gpu.py needs a CUDA GPU (none here); nothing was written")

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qformats  # noqa: E402
from lowering import launch as K  # noqa: E402
from lowering import kernels as KJ  # noqa: E402  (jit helpers for the division check)
from lowering import torch_codec  # noqa: E402
from qformats.codec import saturating_cast  # noqa: E402
from lowering.constants import lower  # noqa: E402
from gpu_bench import (RECORDS, WIDTH, bench, copy_rate, env, open_sink, record, rows_for,  # noqa: E402
                       tests_kernels)

# the formats that keep model quality (rotated INT4-8, the tuned policies' picks), the fast ones, and
# the unrotated 5/6/8-bit formats (issue: quality-safe formats at HBM speed)
FORMATS = ["mxfp8_e4m3", "mxfp4", "mxfp4_h32", "nvfp4",
           "int8/b32/bf16", "int8/b32/bf16+h32", "int6/b32/bf16", "int6/b32/bf16+h32", "int5/b32/bf16",
           "int5/b32/bf16+h32", "int4/b32/bf16+h32", "mxfp6_e3m2",
           "int4/b64/e4m3+h64", "int5/b64/e4m3+h64", "int6/b64/bf16+h64", "int5/b32/e4m3+h32", "int4/b32/e4m3+h32",
           "int5/b64/bf16+h64"]


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------

def adversarial(rows, width, dtype, seed):
    return tests_kernels().adversarial(rows, width, dtype, seed)


def same_bits(a, b) -> bool:
    """Equal shape/dtype, NaN at the same places, identical bits elsewhere."""
    return tests_kernels().same_bits(a, b)


def check_format(fmt: str, mib: float) -> dict:
    """Kernel == oracle for quantize / dequantize / dequant_sum(N) / dequant_sum_requant(N)."""
    rows = rows_for(mib)
    kc = lower(fmt, WIDTH, "cuda")
    out = {}
    for name, x in (("random", (torch.randn(rows, WIDTH) * 3).to(torch.bfloat16)),
                    ("adversarial", adversarial(rows, WIDTH, torch.bfloat16, seed=5)),
                    ("adversarial_fp32", adversarial(max(1, rows // 4), WIDTH, torch.float32, seed=6))):
        buf, deq = K.quantize(x.cuda(), kc, deq_dtype=torch.bfloat16)
        ref = torch_codec.quantize(x, fmt)
        ok_q = torch.equal(buf.cpu(), ref)
        rdec = torch_codec.dequantize(ref, fmt, tuple(x.shape), torch.bfloat16)
        dec = K.dequantize(buf.view(1, -1), kc, x.shape[0], WIDTH, torch.bfloat16)
        out[name] = dict(quantize=ok_q, dequantize=same_bits(dec.cpu(), rdec), fused_deq=same_bits(deq.cpu(), rdec))
    # dequant-sum / requant of N buffers (smaller: the oracle sums on the CPU)
    r2 = max(1, rows // 8)
    for n in (2, 4, 8):
        xs = [(torch.randn(r2, WIDTH) * (i + 1)).to(torch.bfloat16) for i in range(n)]
        xs[0][0, :64] = adversarial(1, 64, torch.bfloat16, seed=n)[0]
        bufs = torch.stack([torch_codec.quantize(x, fmt) for x in xs])
        acc = torch_codec.dequantize(bufs[0], fmt, (r2, WIDTH), torch.float32)
        for i in range(1, n):
            acc = acc + torch_codec.dequantize(bufs[i], fmt, (r2, WIDTH), torch.float32)
        gb = bufs.cuda()
        got = K.dequantize(gb, kc, r2, WIDTH, torch.bfloat16)
        rq, rdq = K.quantize(None, kc, shape=(r2, WIDTH), bufs=gb, deq_dtype=torch.bfloat16)
        want_q = torch_codec.quantize(acc, fmt)
        # the reference's final cast saturates finite values at bf16's max (qformats.codec.saturating_cast)
        out[f"sum{n}"] = dict(dequant_sum=same_bits(got.cpu(), saturating_cast(acc, torch.bfloat16)),
                              requant=torch.equal(rq.cpu(), want_q),
                              requant_deq=same_bits(rdq.cpu(), torch_codec.dequantize(want_q, fmt, (r2, WIDTH),
                                                                                   torch.bfloat16)))
    ok = all(all(v.values()) for v in out.values())
    return record(case="exactness", fmt=fmt, mib=mib, ok=ok, detail=out)


@triton.jit
def _div_check_kernel(s_ptr, x_ptr, n_x, bad_ptr, BLOCK: tl.constexpr):
    """Count (x, s) pairs where the kernels' quotient differs from div_rn (bits)."""
    s = tl.load(s_ptr + tl.program_id(0))
    sv = tl.full((1,), 0.0, tl.float32) + s
    cnt = 0
    for start in range(0, n_x, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_x
        x = tl.load(x_ptr + offs, mask=m, other=1.0)
        q = KJ._signed_like(KJ._exact_quotient(x[None, :], sv, True), x[None, :])
        want = tl.math.div_rn(x[None, :], sv[:, None])
        # the kernels' domain: quotients that can matter, [2^-22, 2^24] (below half the finest
        # element step 2^-19 everything rounds to a zero with x's sign; above every max normal
        # everything saturates); in it x >= 2^-22 * 1e-20, so no residual underflows
        aw = tl.abs(want)
        dom = (aw <= 16777216.0) & (aw >= 2.384185791015625e-07)
        diff = (q.to(tl.int32, bitcast=True) != want.to(tl.int32, bitcast=True)) & m[None, :] & dom
        cnt += tl.sum(tl.sum(diff.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(bad_ptr, cnt)


def check_division() -> dict:
    """The GPU quotient (block reciprocal + two Markstein steps) == div_rn: every finite bf16 x
    over every positive finite bf16 scale, and 2^26 random fp32 pairs."""
    allb = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    finite = allb[torch.isfinite(allb)].cuda()
    scales = finite[finite > 0].contiguous()
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    t = time.time()
    _div_check_kernel[(scales.numel(),)](scales, finite, finite.numel(), bad, BLOCK=4096, enable_fp_fusion=False,
                                         enable_reflect_ftz=False)
    torch.cuda.synchronize()
    bf16_bad = int(bad.item())
    g = torch.Generator(device="cuda").manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (1 << 26,), device="cuda", generator=g, dtype=torch.int64).to(torch.int32)
    xs = bits.view(torch.float32)
    xs = xs[torch.isfinite(xs)].contiguous()
    sb = torch.randint(0x00800000, 0x7F000000, (4096,), device="cuda", generator=g, dtype=torch.int64).to(torch.int32)
    ss = sb.view(torch.float32).contiguous()
    bad.zero_()
    _div_check_kernel[(ss.numel(),)](ss, xs[: 1 << 14].contiguous(), 1 << 14, bad, BLOCK=4096, enable_fp_fusion=False,
                                     enable_reflect_ftz=False)
    torch.cuda.synchronize()
    return record(case="division", bf16_pairs=int(finite.numel() * scales.numel()), bf16_mismatches=bf16_bad,
                  fp32_pairs=int(ss.numel() * (1 << 14)), fp32_mismatches=int(bad.item()), seconds=time.time() - t)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def time_format(fmt: str, mib: float, copy_gbs: float, ns=(2, 4, 8), ops_too=True):
    rows = rows_for(mib)
    x = torch.randn(rows, WIDTH, device="cuda", dtype=torch.bfloat16) * 3
    kc = lower(fmt, WIDTH, "cuda")
    f = qformats.Format.parse(fmt)
    nb = f.nbytes((rows, WIDTH))
    xin = x.numel() * 2
    buf = torch.empty(nb, dtype=torch.uint8, device="cuda")
    K.quantize(x, kc, out=buf)
    y = torch.empty_like(x)

    def rec(step, us, moved, n=1, via="kernel"):
        return record(case=step, fmt=fmt, mib=mib, n=n, via=via, us=us, bytes=moved,
                      frac_copy=moved / us / 1e3 / copy_gbs)

    rec("quantize", bench(lambda: K.quantize(x, kc, out=buf)), xin + nb)
    b1 = buf.view(1, -1)
    rec("dequantize", bench(lambda: K.dequantize(b1, kc, rows, WIDTH, torch.bfloat16, out=y)), xin + nb)
    for n in ns:
        if n * nb + 2 * xin > 40 << 30:
            continue
        bufs = torch.empty(n, nb, dtype=torch.uint8, device="cuda")
        for i in range(n):
            K.quantize(x * (i + 1), kc, out=bufs[i])
        rec("dequant_sum", bench(lambda: K.dequantize(bufs, kc, rows, WIDTH, torch.bfloat16, out=y)),
            n * nb + xin, n)
        red = torch.empty(nb, dtype=torch.uint8, device="cuda")
        rec("dequant_sum_requant", bench(lambda: K.quantize(None, kc, shape=(rows, WIDTH), bufs=bufs, out=red)),
            n * nb + nb, n)
        if ops_too and n == 2:
            shape = [rows, WIDTH]
            rec("dequant_sum", bench(lambda: torch.ops.qformats.dequant_sum(bufs, fmt, shape, torch.bfloat16)),
                n * nb + xin, n, via="op")
            rec("dequant_sum_requant", bench(lambda: torch.ops.qformats.dequant_sum_requant(bufs, fmt, shape)),
                n * nb + nb, n, via="op")
        del bufs
    if ops_too:
        rec("quantize", bench(lambda: torch.ops.qformats.quantize(x, fmt)), xin + nb, via="op")
        rec("dequantize", bench(lambda: torch.ops.qformats.dequantize(buf, fmt, [rows, WIDTH], torch.bfloat16)),
            xin + nb, via="op")


def peers(mib: float, copy_gbs: float):
    rows = rows_for(mib)
    x = torch.randn(rows, WIDTH, device="cuda", dtype=torch.bfloat16) * 3
    xin = x.numel() * 2
    try:
        from torchao.prototype.mx_formats.mx_tensor import ScaleCalculationMode, to_mx
    except Exception as e:  # noqa: BLE001
        record(case="peer", impl="torchao", error=f"{type(e).__name__}: {e}"[:300])
        return
    for name, dt, bits in (("MXFP8", torch.float8_e4m3fn, 8.25), ("MXFP4", torch.float4_e2m1fn_x2, 4.25)):
        try:
            fn = torch.compile(lambda t: to_mx(t, dt, 32, ScaleCalculationMode.FLOOR))
            us = bench(lambda: fn(x))
            moved = xin + int(x.numel() * bits / 8)
            record(case="peer", impl=f"torchao to_mx compiled {name}", mib=mib, us=us, bytes=moved,
                   frac_copy=moved / us / 1e3 / copy_gbs)
        except Exception as e:  # noqa: BLE001
            record(case="peer", impl=f"torchao to_mx compiled {name}", mib=mib, error=f"{type(e).__name__}: {e}"[:300])
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

        fn = torch.compile(lambda t: NVFP4Tensor.to_nvfp4(t))
        us = bench(lambda: fn(x))
        moved = xin + int(x.numel() * 4.5 / 8)
        record(case="peer", impl="torchao NVFP4Tensor.to_nvfp4 compiled", mib=mib, us=us, bytes=moved,
               frac_copy=moved / us / 1e3 / copy_gbs)
    except Exception as e:  # noqa: BLE001
        record(case="peer", impl="torchao NVFP4Tensor.to_nvfp4 compiled", mib=mib, error=f"{type(e).__name__}: {e}"[:300])
    try:
        from torchao.prototype.mx_formats.kernels import triton_to_mxfp8_dim0

        us = bench(lambda: triton_to_mxfp8_dim0(x, inner_block_size=32))
        moved = xin + int(x.numel() * 8.25 / 8)
        record(case="peer", impl="torchao triton_to_mxfp8_dim0", mib=mib, us=us, bytes=moved,
               frac_copy=moved / us / 1e3 / copy_gbs)
    except Exception as e:  # noqa: BLE001
        record(case="peer", impl="torchao triton_to_mxfp8_dim0", mib=mib, error=f"{type(e).__name__}: {e}"[:300])
    for fmt in ("mxfp8_e4m3", "mxfp4"):
        try:
            fn = torch.compile(lambda t: torch_codec.quantize(t, fmt))
            us = bench(lambda: fn(x))
            moved = xin + qformats.Format.parse(fmt).nbytes(x.shape)
            record(case="peer", impl=f"torch.compile(TorchCodec.quantize) {fmt}", mib=mib, us=us, bytes=moved,
                   frac_copy=moved / us / 1e3 / copy_gbs)
        except Exception as e:  # noqa: BLE001
            record(case="peer", impl=f"torch.compile(TorchCodec.quantize) {fmt}", mib=mib,
                   error=f"{type(e).__name__}: {e}"[:300])


def small_ops(fmts):
    """1 MiB (decode-sized) messages through the ops, captured in a CUDA graph."""
    rows = rows_for(1)
    for fmt in fmts:
        x = torch.randn(rows, WIDTH, device="cuda", dtype=torch.bfloat16)
        buf = torch.ops.qformats.quantize(x, fmt)
        bufs = torch.stack([buf, buf])
        sh = [rows, WIDTH]
        for step, fn in (("quantize", lambda: torch.ops.qformats.quantize(x, fmt)),
                         ("dequantize", lambda: torch.ops.qformats.dequantize(buf, fmt, sh, torch.bfloat16)),
                         ("dequant_sum", lambda: torch.ops.qformats.dequant_sum(bufs, fmt, sh, torch.bfloat16)),
                         ("dequant_sum_requant", lambda: torch.ops.qformats.dequant_sum_requant(bufs, fmt, sh))):
            record(case=step, fmt=fmt, mib=1, n=2 if "sum" in step else 1, via="op-graph", us=bench(fn))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="1,8,64,128,256")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--check-mib", type=float, default=64)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="exactness checks only (no timing)")
    ap.add_argument("--division-only", action="store_true")
    ap.add_argument("--tile", default="", help="elements,warps override (QFORMATS_TILE) for a sweep")
    a = ap.parse_args()
    open_sink(a.out)
    if a.tile:
        os.environ["QFORMATS_TILE"] = a.tile
        K._plan.cache_clear()
    record(case="env", **env(), tile=a.tile or "table")
    fmts = [f for f in a.formats.split(",") if f]
    sizes = [float(s) for s in a.sizes.split(",")]
    copy = {m: copy_rate(m) for m in sorted(set(sizes + [64.0, 128.0, 256.0]))}
    if a.no_check and not fmts:
        return
    ref_copy = copy[256.0]
    t0 = time.time()
    if a.division_only:
        print(json.dumps(check_division()))
        return
    if not a.no_check:
        check_division()
        for fmt in fmts:
            check_format(fmt, a.check_mib)
        print(f"checks: {time.time() - t0:.0f} s", flush=True)
        if a.check_only:
            table(RECORDS)
            return
    for fmt in fmts:
        for m in sizes:
            time_format(fmt, m, copy.get(m, ref_copy), ops_too=(m in (1.0, 64.0)))
        print(f"timed {fmt} ({time.time() - t0:.0f} s)", flush=True)
    # the TP=2 all-reduce's compute (quantize + dequant-sum of 2) at 128 MiB beside its byte-ideal
    for fmt in fmts:
        if 128.0 not in sizes:
            time_format(fmt, 128, copy.get(128.0, ref_copy), ns=(2,), ops_too=False)
    tp2_compute(RECORDS, copy.get(128.0, ref_copy))
    if 1.0 in sizes:
        small_ops(fmts)
    if not a.no_peers:
        peers(256, ref_copy)
        peers(64, copy[64.0])
    table(RECORDS)


def tp2_compute(recs, copy_gbs: float):
    """Record, per format, quantize + dequant-sum of 2 at 128 MiB (kernel time) and its
    byte-ideal: the input and output (2 x 128 MiB) plus the wire buffer written once and read
    twice, at the copy rate of the run."""
    for fmt in dict.fromkeys(r["fmt"] for r in recs if r.get("via") == "kernel"):
        q = [r for r in recs if r.get("via") == "kernel" and r["fmt"] == fmt and r["mib"] == 128 and r["case"] == "quantize"]
        d = [r for r in recs if r.get("via") == "kernel" and r["fmt"] == fmt and r["mib"] == 128
             and r["case"] == "dequant_sum" and r["n"] == 2]
        if q and d:
            nb = q[0]["bytes"] - rows_for(128) * WIDTH * 2
            ideal = (2 * rows_for(128) * WIDTH * 2 + 3 * nb) / copy_gbs / 1e3
            record(case="tp2_compute", fmt=fmt, mib=128, us=q[0]["us"] + d[0]["us"], ideal_us=ideal,
                   ratio=(q[0]["us"] + d[0]["us"]) / ideal)


def table(recs):
    print("copy: " + ", ".join(f"{r['mib']:g} MiB {r['gbs']:.0f} GB/s" for r in recs if r["case"] == "copy"))
    for r in recs:
        if r["case"] in ("division", "exactness") and (r["case"] == "division" or not r["ok"]):
            print(json.dumps(r))
    ex = [r for r in recs if r["case"] == "exactness"]
    print(f"exactness: {sum(r['ok'] for r in ex)}/{len(ex)} formats bit-exact")
    print(f"{'fmt':22s} {'MiB':>5s} {'quant':>12s} {'dequant':>12s} {'dsum2':>12s} {'dsum4':>12s} {'dsum8':>12s} "
          f"{'dsr2':>12s} {'dsr4':>12s} {'dsr8':>12s}")
    keys = sorted({(r["fmt"], r["mib"]) for r in recs if r.get("via") == "kernel"}, key=lambda k: (k[0], k[1]))
    for fmt, mib in keys:
        def cell(step, n):
            rr = [r for r in recs if r.get("via") == "kernel" and r["fmt"] == fmt and r["mib"] == mib
                  and r["case"] == step and r["n"] == n]
            return f"{rr[0]['us']:7.1f}/{rr[0]['frac_copy']*100:3.0f}%" if rr else ""
        print(f"{fmt:22s} {mib:5g} {cell('quantize', 1):>12s} {cell('dequantize', 1):>12s} "
              + " ".join(f"{cell('dequant_sum', n):>12s}" for n in (2, 4, 8)) + " "
              + " ".join(f"{cell('dequant_sum_requant', n):>12s}" for n in (2, 4, 8)))
    for r in recs:
        if r["case"] == "peer":
            print(r.get("impl"), r.get("mib"), f"{r['us']:.1f} us {r['frac_copy']*100:.0f}%" if "us" in r else r.get("error"))
    for r in recs:
        if r["case"] == "tp2_compute":
            print(f"TP=2 compute 128 MiB {r['fmt']:22s} {r['us']:7.1f} us, ideal {r['ideal_us']:6.1f} us, x{r['ratio']:.2f}")
    for r in recs:
        if r.get("via") in ("op-graph",):
            print(f"op in graph 1 MiB {r['fmt']} {r['case']}: {r['us']:.1f} us")


if __name__ == "__main__":
    main()
