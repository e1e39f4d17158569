"""``python -m skinfusion``: the command line."""

import sys

from skinfusion.cli import main

sys.exit(main())
