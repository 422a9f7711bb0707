"""``python -m tracekit``: the command line."""

import sys

from tracekit.cli import main

sys.exit(main())
