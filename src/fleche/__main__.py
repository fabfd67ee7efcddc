"""``python -m fleche``: the command line (see :mod:`fleche.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
