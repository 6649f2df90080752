"""`python train/dpo.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.dpo.

The same as `mixtral-tune dpo ARGS` and `python -m mixtral_tune.dpo ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.dpo import main

if __name__ == "__main__":
    main(sys.argv[1:])
