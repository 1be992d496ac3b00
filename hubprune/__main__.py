"""``python -m hubprune``: the same command line as ``hubprune``."""

import sys

from hubprune.cli import main

sys.exit(main())
