"""`python -m memd.hugepages_admin`: the hugepage set-up command under its short,
documented name (it lives in `memd.cli.hugepages_admin`)."""

import sys

from memd.cli.hugepages_admin import main

if __name__ == "__main__":
    sys.exit(main())
