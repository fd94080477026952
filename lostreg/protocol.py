"""``python -m lostreg.protocol``: the command; the code is ``lostreg.reports.protocol``."""

import sys

from lostreg.reports.protocol import main

if __name__ == "__main__":
    sys.exit(main())
