"""`python -m memd` and the `memd` command: the primary daemon."""

import faulthandler
import sys


def main() -> int:
    """Run the daemon (memd.primary.daemon.main) with faulthandler on: a primary
    killed by SIGSEGV, SIGBUS, SIGABRT, SIGFPE or SIGILL logs where (to stderr,
    its log).  Enabled before memd._ext loads: its SIGSEGV/SIGBUS guard hands the
    faults it does not expect to the handler that was there before."""
    faulthandler.enable()
    from memd.primary.daemon import main as daemon_main  # loads memd._ext

    return daemon_main()


if __name__ == "__main__":
    sys.exit(main())
