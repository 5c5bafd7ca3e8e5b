"""`python -m eardrum.cli ...` runs the `eardrum` command (as `accelerate launch -m eardrum.cli` needs)."""

import sys

from eardrum.cli.main import main

sys.exit(main())
