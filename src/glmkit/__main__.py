"""`python -m glmkit` runs the same entry point as the `glmkit` command."""

import sys

from glmkit.cli import main

sys.exit(main())
