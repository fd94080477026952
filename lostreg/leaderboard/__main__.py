"""``python -m lostreg.leaderboard``."""

import sys

from lostreg.leaderboard import main

sys.exit(main())
