"""Command-line tools besides the daemon: `memctl` and the hugepage administration
(`python -m memd.hugepages_admin`)."""
