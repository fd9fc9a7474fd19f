"""Codec throughput: the lowered ops vs the HBM copy bandwidth and vs torch.compile(reference).

Run on a GPU (results are only meaningful there)::

    pytest benchmarks/test_bench_codec.py --benchmark-only --benchmark-enable \
        --benchmark-json=$OUT/codec.json
    python benchmarks/report_codec.py $OUT/codec.json > benchmarks/results/kernels/codec_<device>.md

Cases, for each format in FORMATS and bf16 inputs of SIZES_MIB ([rows, 4096]):
``copy`` (a device-to-device copy of the input: the HBM bandwidth of this run),
``quantize`` / ``dequantize`` / ``dequant_sum`` / ``dequant_sum_requant`` (N = 2, 4, 8; the
``torch.ops.qformats`` ops, host-timed: what a caller of the ops gets, launch cost included;
``benchmarks/codec_gpu.py`` gives kernel time in CUDA graphs), and the first two through
``torch.compile`` of the reference codec at COMPILED_REF_MIB sizes (compiling the float64
reference per shape is slow and it needs ~20x the input in temporaries). Every case stores
the bytes it must move (input read once + output written once) in ``extra_info``.

Timers are CUDA-synchronised (each round ends with ``torch.cuda.synchronize()``). On CPU, with
``--benchmark-disable`` (the project default), each case runs once on a small input as a
test (kernels interpreted), so the suite cannot rot.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are defined: run them interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lowering  # noqa: F401  (registers torch.ops.qformats)
import qformats
from lowering import ops

CUDA = torch.cuda.is_available()
FORMATS = ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "int4/b32/bf16", "flash_int4", "nvfp4"]
SIZES_MIB = [1, 4, 16, 64, 256, 1024] if CUDA else [0.0625]
COMPILED_REF_MIB = [int(s) for s in os.environ.get("QF_BENCH_REF_MIB", "64").split(",") if s] if CUDA else [0.0625]
WIDTH = 4096


def _input(mib: float) -> torch.Tensor:
    n = int(mib * (1 << 20)) // 2
    g = torch.Generator(device="cuda" if CUDA else "cpu").manual_seed(0)
    return torch.randn(n // WIDTH, WIDTH, generator=g, device=g.device, dtype=torch.bfloat16)


def _info(benchmark, **kw):
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__, triton=__import__("triton").__version__, **kw)


def _run(benchmark, fn, rounds):
    def timed():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2 if CUDA else 0)


def _rounds(mib):
    return 1 if not CUDA else max(5, min(100, int(2048 / mib)))


@pytest.mark.parametrize("mib", SIZES_MIB)
def test_copy(benchmark, mib):
    x = _input(mib)
    y = torch.empty_like(x)
    _info(benchmark, case="copy", fmt="-", mib=mib, bytes=2 * x.numel() * x.element_size())
    _run(benchmark, lambda: y.copy_(x), _rounds(mib))
    assert torch.equal(y, x)


@pytest.mark.parametrize("mib", SIZES_MIB)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize(benchmark, fmt, mib):
    x = _input(mib)
    nbytes = qformats.need_format(fmt).nbytes(x.shape)
    _info(benchmark, case="quantize", impl="triton", fmt=fmt, mib=mib,
          bytes=x.numel() * 2 + nbytes, path=ops.path(fmt, x.device))
    buf = _run(benchmark, lambda: torch.ops.qformats.quantize(x, fmt), _rounds(mib))
    if mib <= 16:  # cheap spot check against the reference (the tests do the full job)
        assert torch.equal(buf.cpu(), ops.reference_quantize(x.cpu(), fmt))


@pytest.mark.parametrize("mib", SIZES_MIB)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize(benchmark, fmt, mib):
    x = _input(mib)
    buf = torch.ops.qformats.quantize(x, fmt)
    shape = list(x.shape)
    _info(benchmark, case="dequantize", impl="triton", fmt=fmt, mib=mib,
          bytes=buf.numel() + x.numel() * 2, path=ops.path(fmt, x.device))
    y = _run(benchmark, lambda: torch.ops.qformats.dequantize(buf, fmt, shape, torch.bfloat16), _rounds(mib))
    if mib <= 16:
        assert torch.equal(y.cpu(), ops.reference_dequantize(buf.cpu(), fmt, shape, torch.bfloat16))


def _buffers(x, fmt, n):
    """[n, nbytes] wire buffers of x, 2x, ..., n*x (distinct partials, as ranks send)."""
    return torch.stack([torch.ops.qformats.quantize(x * (i + 1), fmt) for i in range(n)])


@pytest.mark.parametrize("n", [2, 4, 8] if CUDA else [2])
@pytest.mark.parametrize("mib", SIZES_MIB)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_sum(benchmark, fmt, mib, n):
    """The gather step of a compressed all-reduce: N wire buffers -> one fp32-summed bf16 tensor."""
    x = _input(mib)
    bufs = _buffers(x, fmt, n)
    shape = list(x.shape)
    _info(benchmark, case="dequant_sum", impl="triton", fmt=fmt, mib=mib, n=n,
          bytes=bufs.numel() + x.numel() * 2, path=ops.path(fmt, x.device))
    y = _run(benchmark, lambda: torch.ops.qformats.dequant_sum(bufs, fmt, shape, torch.bfloat16), _rounds(mib))
    if mib <= 16:
        assert torch.equal(y.cpu(), ops.reference_dequant_sum(bufs.cpu(), fmt, shape, torch.bfloat16))


@pytest.mark.parametrize("n", [2, 4, 8] if CUDA else [2])
@pytest.mark.parametrize("mib", SIZES_MIB)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_sum_requant(benchmark, fmt, mib, n):
    """The middle step of two_shot: N wire buffers -> their fp32 sum, re-quantised."""
    x = _input(mib)
    bufs = _buffers(x, fmt, n)
    shape = list(x.shape)
    _info(benchmark, case="dequant_sum_requant", impl="triton", fmt=fmt, mib=mib, n=n,
          bytes=bufs.numel() + bufs.shape[1], path=ops.path(fmt, x.device))
    buf, _ = _run(benchmark, lambda: torch.ops.qformats.dequant_sum_requant(bufs, fmt, shape), _rounds(mib))
    if mib <= 16:
        assert torch.equal(buf.cpu(), ops.reference_dequant_sum_requant(bufs.cpu(), fmt, shape)[0])


_COMPILED = {}


def _compiled(kind):
    if kind not in _COMPILED:
        fn = ops.reference_quantize if kind == "quantize" else ops.reference_dequantize
        _COMPILED[kind] = torch.compile(fn, dynamic=False)
    return _COMPILED[kind]


@pytest.mark.parametrize("mib", COMPILED_REF_MIB)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["quantize", "dequantize"])
def test_compiled_reference(benchmark, kind, fmt, mib):
    """torch.compile of the reference codec: what a user gets without the kernels."""
    if not CUDA:
        pytest.skip("torch.compile of the reference is only timed on a GPU (CPU compile of float64 code is minutes)")
    x = _input(mib)
    buf = torch.ops.qformats.quantize(x, fmt)
    shape = list(x.shape)
    nbytes = x.numel() * 2 + buf.numel()
    _info(benchmark, case=kind, impl="compiled_reference", fmt=fmt, mib=mib, bytes=nbytes)
    fn = _compiled(kind)
    call = (lambda: fn(x, fmt)) if kind == "quantize" else (lambda: fn(buf, fmt, shape, torch.bfloat16))
    try:
        out = call()  # compile outside the timed region
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (record why it does not compile, do not hide it)
        benchmark.extra_info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        pytest.skip(f"torch.compile of the reference failed: {benchmark.extra_info['error']}")
    want = buf if kind == "quantize" else torch.ops.qformats.dequantize(buf, fmt, shape, torch.bfloat16)
    benchmark.extra_info["matches_kernel"] = bool(torch.equal(out, want))
    _run(benchmark, call, max(3, _rounds(mib) // 4))
