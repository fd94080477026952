"""``python -m lostreg.protocol``."""

import sys

from lostreg.protocol.cli import main

sys.exit(main())
