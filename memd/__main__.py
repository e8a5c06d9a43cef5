"""`python -m memd`: the primary daemon."""

import sys

from memd.daemon import main

sys.exit(main())
