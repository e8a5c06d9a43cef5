"""memd: a hugepage memory manager for Python (DPDK memory subsystem as a daemon)."""
