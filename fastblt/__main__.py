"""``python -m fastblt``: the ``fastblt`` command."""

import sys

from fastblt.cli import main

sys.exit(main())
