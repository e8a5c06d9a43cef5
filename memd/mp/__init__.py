"""Multi-process communication (DPDK's `rte_mp_*` and `malloc_mp.c`): the wire format
and channel, who may talk to the primary, and heap growth and release on both sides."""
