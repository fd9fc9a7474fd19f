"""``python -m tp`` / ``torchrun --nproc-per-node N -m tp``: see :mod:`tp.launch`."""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
