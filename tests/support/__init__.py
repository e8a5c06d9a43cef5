"""Test doubles and helpers shared by the tests: fake_admin (an AdminSource),
fake_memory (a Memory for rings and mempools), fake_sys (/sys and /proc trees),
forking (children with a bound)."""
