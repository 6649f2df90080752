"""`python train/orpo.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.orpo.

The same as `mixtral-tune orpo ARGS` and `python -m mixtral_tune.orpo ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.orpo import main

if __name__ == "__main__":
    main(sys.argv[1:])
