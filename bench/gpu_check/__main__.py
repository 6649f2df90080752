"""`python -m bench.gpu_check`: the same command as `python bench/gpu_check.py`."""

import sys

from bench.gpu_check.cli import main

sys.exit(main())
