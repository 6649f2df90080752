"""`python train/sft.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.sft.

The same as `mixtral-tune sft ARGS` and `python -m mixtral_tune.sft ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

import sys

from mixtral_tune.sft import main

if __name__ == "__main__":
    main(sys.argv[1:])
