"""Moved to :mod:`hf_sparse.calibration` (shared with GPTQ export); this name keeps old imports working."""

from ..calibration import *  # noqa: F401,F403
from ..calibration import __all__  # noqa: F401
