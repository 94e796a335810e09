"""``python -m mtkernels ...``: the command line (see `mtkernels.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
