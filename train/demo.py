"""`python train/demo.py ARGS` from a checkout (also under torchrun): runs mixtral_tune.demo.

The same as `mixtral-tune demo ARGS` and `python -m mixtral_tune.demo ARGS`. The package must be
importable (`pip install -e .` in the checkout): this script does not edit sys.path.
"""

from mixtral_tune.demo import main

if __name__ == "__main__":
    main()
