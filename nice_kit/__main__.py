"""``python -m nice_kit`` (and ``torchrun ... -m nice_kit``): the ``nice-kit`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
