"""GPU-only scripts run on a CPU machine: they say they need a CUDA GPU and leave no files."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-machine behaviour")
@pytest.mark.parametrize("script", ["codec_gpu.py", "rmsnorm_gpu.py"])
def test_codec_gpu_needs_a_gpu_and_writes_nothing(tmp_path, script):
    out = tmp_path / "codec.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sass_report_compiles_a_launch_on_this_machine(tmp_path):
    """The static profiler needs no GPU: one format, one step, compiled for sm_90 here; its hash
    file names the launch and its table the counts."""
    import os

    import triton.backends.nvidia as nv

    if not os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")):
        pytest.skip("this Triton wheel ships no cuobjdump")
    out, hashes = tmp_path / "r.md", tmp_path / "h.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_report.py"), "--formats", "mxfp4",
                           "--steps", "q_bf16", "--out", str(out), "--hashes", str(hashes)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fmt, step, sass, digest = hashes.read_text().split()
    assert (fmt, step) == ("mxfp4", "q_bf16#0") and int(sass) > 100 and len(digest) == 12
    assert "| mxfp4 | q_bf16#0 | " + sass + " |" in out.read_text()
