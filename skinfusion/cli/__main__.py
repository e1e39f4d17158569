"""``python -m skinfusion.cli``: the command line."""

import sys

from skinfusion.cli import main

sys.exit(main())
