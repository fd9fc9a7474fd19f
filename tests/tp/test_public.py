"""The names README documents resolve, and the short paths are the moved modules themselves."""
import subprocess
import sys

from tests.conftest import ROOT


def test_readme_names_resolve_to_the_one_implementation():
    import tp.comm.fused
    import tp.study.hf
    from tp.fused import FusedAllReduce, auto_window

    assert tp.fused is tp.comm.fused and tp.hf is tp.study.hf
    assert FusedAllReduce is tp.comm.fused.FusedAllReduce and callable(auto_window)
    assert isinstance(tp.hf.Policy("mxfp4"), tp.CommPolicy) and isinstance(tp.CollectivePolicy("mxfp4"), tp.CommPolicy)
    for name in ("all_reduce", "all_gather", "reduce_scatter", "emulate_all_reduce", "set_codec", "get_codec",
                 "compile", "print_collectives", "TPLlama", "calibrate"):
        assert callable(getattr(tp, name)), name
    assert tp.hf.emulate_tp.__module__ == "tp.study.hf" and tp.compile.__module__ == "tp.comm.compile"


def test_python_dash_m_tp_is_the_launcher():
    out = subprocess.run([sys.executable, "-m", "tp", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--policy FILE" in out.stdout and "--min-bytes" in out.stdout
