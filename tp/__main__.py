"""``python -m tp`` / ``torchrun --nproc-per-node N -m tp``: see :mod:`tp.model.launch`."""
import os
import sys

from .model.launch import main

if __name__ == "__main__":
    code = main()
    # The process group is gone (launch.main's barrier + destroy); leave without running C++ static
    # destructors: under load a gloo rank could still abort there ("terminate called without an
    # active exception", exit -6) after its output was complete, seen about once in 12 runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)
