"""The kernel's named interface: the format reaches the codec kernel as one constexpr ``F``
(a :class:`lowering.constants.KernelFormat`) read by name, and every field it carries is read
(a constant nobody reads is a constant somebody will set in vain)."""
import ast
import re

import lowering
from lowering import kernel_math, kernel_wire, kernels, launch
from lowering.constants import KernelFormat, lower
from tests.conftest import ROOT

KERNEL_MODULES = (kernels, kernel_math, kernel_wire)


def _reads() -> set:
    names = set()
    for m in KERNEL_MODULES:
        names |= set(re.findall(r"\bF\.([A-Z][A-Z_0-9]*[A-Z0-9])\b", (ROOT / m.__name__.replace(".", "/")).with_suffix(".py")
                                .read_text()))
    return names


def test_every_format_field_is_read_and_every_read_is_a_field():
    reads = _reads()
    assert reads == set(KernelFormat._fields), (sorted(set(KernelFormat._fields) - reads),
                                                sorted(reads - set(KernelFormat._fields)))


def test_the_kernel_takes_the_format_as_one_argument():
    """No format constant is a kernel parameter of its own (they travel in F), and the launchers
    pass F from KernelConstants, never a field by hand."""
    params = set(kernels._codec_kernel.arg_names)
    assert "F" in params and not (params & set(KernelFormat._fields) - {"BPP"}), sorted(params)
    tree = ast.parse((ROOT / "lowering" / "launch.py").read_text())
    kws = [k for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg]
    assert not {k.arg for k in kws} & set(KernelFormat._fields), "a launcher passes a format field by hand"
    passed = [ast.unparse(k.value) for k in kws if k.arg == "F"]
    assert len(passed) >= 4 and set(passed) == {"kc.F"}, passed


def test_f_is_derived_from_the_lowered_constants():
    kc = lower("int5/b32/bf16+h32", 96, "cpu")
    assert kc.F.MAXV == 2 * kc.MAXN and kc.F.ROT == 5 and kc.F.BITS == 5 and (kc.F.P0, kc.F.P1) == (4, 1)
    assert kc.F is kc.F and hash(kc.F) == hash(lower("int5/b32/bf16+h32", 96, "cpu").F)
    assert lowering.launch is launch
