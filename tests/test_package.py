"""The package's public surface and the rule between its halves."""

from __future__ import annotations

import subprocess
import sys


def test_memd_exports_the_primary_and_the_errors() -> None:
    import memd
    from memd import errors, primary

    assert memd.Primary is primary.Primary and memd.Options is primary.Options
    for name in ("MemdError", "PrimaryNotRunning", "PermissionDenied", "VersionMismatch"):
        assert getattr(memd, name) is getattr(errors, name)
    assert set(memd.__all__) >= {"Primary", "Options", "InitError", "MemdError"}


def test_a_secondary_never_imports_the_daemon() -> None:
    """What a secondary imports (memd_client, and memd for its errors) must not
    load the primary, its server or its hugepage setup."""
    code = (
        "import sys, memd, memd_client\n"
        "print(sorted(m for m in sys.modules if m in ('memd.primary', 'memd.daemon', "
        "'memd.hugepages_admin', 'memd.telemetry', 'memd.api')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout
