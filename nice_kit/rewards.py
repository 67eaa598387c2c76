"""Deprecated: the metrics moved to :mod:`nice_kit.metrics`. This module keeps
``from nice_kit.rewards import ...`` working for one release."""

import warnings

from .metrics import *  # noqa: F401,F403
from .metrics import __all__  # noqa: F401

warnings.warn("nice_kit.rewards moved to nice_kit.metrics; import from there", DeprecationWarning, stacklevel=2)
