"""`python -m xmodal.server.cli ...`: the same as the `xmodal` console script."""

import sys

from xmodal.server.cli import main

sys.exit(main())
