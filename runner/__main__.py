"""`python -m runner`: the same command line as the `runner` console script."""

import sys

from runner.cli import main

sys.exit(main())
