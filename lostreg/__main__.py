import sys

from lostreg.cli import main

sys.exit(main())
