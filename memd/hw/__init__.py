"""What the machine has: hugepage sizes, pools, mounts and NUMA nodes, and physical
addresses (IOVA) from /proc/self/pagemap."""
