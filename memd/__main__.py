"""`python -m memd`: the primary daemon."""

import sys

from memd.primary.daemon import main

sys.exit(main())
