"""`python -m glmkit.train ...` (what torchrun runs): the same as `glmkit train ...`."""

import sys

from glmkit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
