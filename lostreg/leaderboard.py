"""``python -m lostreg.leaderboard``: the command; the code is ``lostreg.reports.leaderboard``."""

import sys

from lostreg.reports.leaderboard import main

if __name__ == "__main__":
    sys.exit(main())
