"""``python -m lostreg.protocol``."""

import sys

from lostreg.reports.protocol.cli import main

sys.exit(main())
