"""``python -m tools.loadgen`` from a checkout (``python -m wirehub.loadgen`` when installed)."""

import sys

from .cli import main

sys.exit(main())
