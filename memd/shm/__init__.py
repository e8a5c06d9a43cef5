"""The shared-memory model both sides use: the config's views, memseg lists and page
files, memzones, heaps, rings, mempools and named objects.  Nothing here imports the
daemon (`memd.primary`, `memd.admin`, `memd.cli`)."""
