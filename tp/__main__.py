"""``python -m tp`` / ``torchrun --nproc-per-node N -m tp``: see :mod:`tp.model.launch`."""
import sys

from .model.launch import main

if __name__ == "__main__":
    sys.exit(main())
