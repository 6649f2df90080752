"""`python train/kto.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.kto.

The same as `mixtral-tune kto ARGS` and `python -m mixtral_tune.kto ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.kto import main

if __name__ == "__main__":
    main(sys.argv[1:])
