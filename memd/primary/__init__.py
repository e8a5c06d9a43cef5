"""The primary process (DPDK's `rte_eal_init` in a primary): initialisation, page
allocation, serving secondaries, the `memd` command."""

from memd.primary.primary import AlreadyRunning, InitError, Options, Primary

__all__ = ["AlreadyRunning", "InitError", "Options", "Primary"]
