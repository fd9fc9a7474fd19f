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
