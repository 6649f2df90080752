"""`python -m mixtral_tune COMMAND ARGS`: the `mixtral-tune` command (mixtral_tune/cli.py)."""

import sys

from mixtral_tune.cli import main

sys.exit(main())
