"""``python -m dynconv.bench <subcommand> [options]``: see :mod:`dynconv.bench`."""

import sys

from . import main

sys.exit(main())
