"""Entry script of the GPU check; the sections live in the package bench/gpu_check/ (its docstring says what
each one measures).

    python bench/gpu_check.py --out bench/results            # one H100/H200: stops itself after --budget-s (450)
    python bench/gpu_check.py --dry-run --out /tmp/check     # tiny shapes on CPU (automatic without CUDA)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, so that `bench` imports
from bench.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
