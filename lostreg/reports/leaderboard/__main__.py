"""``python -m lostreg.leaderboard``."""

import sys

from lostreg.reports.leaderboard import main

sys.exit(main())
