"""``python -m xr_rasteragg``: the ``rasteragg`` command line (see :mod:`xr_rasteragg.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
