"""The shared bit recipes (``lowering.codec``'s docstring) name functions that exist: a rename
in one of the three arithmetics must update the table that says where each recipe lives."""
import importlib
import re

import lowering
import qformats
from qformats import codec as ref
from qformats import grid, packing
from lowering import codec, constants, kernel_math, kernel_wire, kernels, launch, torch_codec

HOMES = {
    "reference": (ref, grid, packing, codec, qformats),
    "TorchCodec": (torch_codec, torch_codec.TorchCodec, ref, grid, qformats),
    "kernel": (kernels, kernel_math, kernel_wire, launch, constants, constants.KernelConstants),
}


def _rows():
    """(implementation, names) per table row, continuation lines included."""
    section = codec.__doc__.split("The shared bit recipes")[1]
    rows, who = [], None
    for line in section.splitlines():
        m = re.match(r"^    (reference|TorchCodec|kernel)\s+(.*)$", line)
        if m:
            who = m.group(1)
            # one line may name several: "``a``; TorchCodec ``b``; kernel: not lowered"
            parts = re.split(r";\s*(TorchCodec|kernel)\b", m.group(2))
            rows.append((who, parts[0]))
            rows += [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
        elif who and line.startswith(" " * 16):
            rows[-1] = (who, rows[-1][1] + " " + line.strip())
        else:
            who = None
    return rows


NOT_FUNCTIONS = {"cvt.rn.satfinite", "maxn_ts"}  # a PTX instruction, a local variable named beside its function


def _exists(name: str, homes) -> bool:
    mod, _, attr = name.rpartition(".")
    if mod.startswith(("qformats", "lowering")):
        try:
            return hasattr(importlib.import_module(mod), attr)
        except ImportError:
            return False
    head, *rest = name.split(".")
    for h in homes:
        obj = getattr(h, head, None)
        for part in rest:
            obj = getattr(obj, part, None)
        if obj is not None:
            return True
    return False


def test_every_named_function_exists():
    rows = _rows()
    assert len(rows) >= 30 and {w for w, _ in rows} == set(HOMES)
    missing = []
    for who, text in rows:
        # ``names`` that look like code (skip constants such as FP32_TINY and constexpr names)
        for name in re.findall(r"``([A-Za-z_][\w.]*)``", text):
            if name.isupper() or name.split(".")[-1].isupper() or name in NOT_FUNCTIONS:
                continue
            homes = HOMES[who] + ((lowering,) if "." in name else ())
            if not _exists(name, homes):
                missing.append((who, name))
    assert not missing, missing
