"""`python train/cpo.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.cpo.

The same as `mixtral-tune cpo ARGS` and `python -m mixtral_tune.cpo ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.cpo import main

if __name__ == "__main__":
    main(sys.argv[1:])
