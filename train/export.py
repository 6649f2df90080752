"""`python train/export.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.export.

The same as `mixtral-tune export ARGS` and `python -m mixtral_tune.export ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.export import main

if __name__ == "__main__":
    main(sys.argv[1:])
