"""README's short path of :mod:`tp.study.hf`: ``import tp.hf`` gives that very module."""
import sys

from .study import hf as _hf

sys.modules[__name__] = _hf
