"""`python -m benchmarks ...` from the repository root (PYTHONPATH=$PWD elsewhere)."""

import sys

from benchmarks.cli import main

sys.exit(main())
