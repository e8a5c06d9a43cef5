"""The package's public surface and the rule between its halves."""

from __future__ import annotations

import subprocess
import sys

TEST_HOOKS = (
    "heap_realloc",
    "heap_block_size",
    "heap_block",
    "_heap_crash_after",
    "_ring_crash_after",
)


def test_memd_exports_the_primary_and_the_errors() -> None:
    import memd
    import memd.primary
    from memd import errors

    assert memd.Primary is memd.primary.Primary and memd.Options is memd.primary.Options
    for name in ("MemdError", "PrimaryNotRunning", "PermissionDenied", "VersionMismatch"):
        assert getattr(memd, name) is getattr(errors, name)
    assert set(memd.__all__) >= {"Primary", "Options", "InitError", "MemdError"}


def test_a_secondary_never_imports_the_daemon() -> None:
    """What a secondary imports (memd_client, and memd for its errors) must not
    load the primary, its server or its hugepage setup."""
    code = (
        "import sys, memd, memd_client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['memd', 'primary'], ['memd', 'admin'], ['memd', 'cli'])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_extension_stub_names_exactly_what_the_extension_has() -> None:
    """memd/_ext.pyi is the one written signature of each C call: it must name every
    public function, class and constant of memd._ext, and nothing else."""
    import ast
    from pathlib import Path

    from memd import _ext

    tree = ast.parse((Path(_ext.__file__).parent / "_ext.pyi").read_text())
    stub: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            members = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id
                for n in getattr(node, "body", [])
                if isinstance(n, ast.FunctionDef)
                or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
            }
            stub[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub[node.target.id] = set()
    # the test hooks are in test builds only: the stub, shipped with the wheel, omits them
    public = {n for n in dir(_ext) if not n.startswith("_")} - set(TEST_HOOKS)
    assert set(stub) - {n for n in stub if n.startswith("_")} == public
    for name, members in stub.items():
        obj = getattr(_ext, name, None)
        if isinstance(obj, type):
            missing = {m for m in members if not m.startswith("__") and not hasattr(obj, m)}
            assert not missing, f"{name}: the stub names {missing}, which the type lacks"


def test_test_hooks_are_in_the_test_build_only(tmp_path) -> None:
    """Crash points and offset-level heap calls exist for the tests (`make ext` sets
    MEMD_TEST_HOOKS); a build without it, as `pip install .` makes, has none, even
    right after a test build in the same build dirs."""
    import os
    from pathlib import Path

    from memd import _ext

    assert all(hasattr(_ext, n) for n in TEST_HOOKS), "run the tests on `make ext`'s build"
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "MEMD_TEST_HOOKS"}
    # a test build first, in the same dirs: its objects must not be reused
    for hooks in ({"MEMD_TEST_HOOKS": "1"}, {}):
        subprocess.run(
            [
                sys.executable,
                "setup.py",
                "-q",
                "build_ext",
                "-b",
                tmp_path / "b",
                "-t",
                tmp_path / "t",
            ],
            cwd=root,
            env=env | hooks,
            capture_output=True,
            timeout=600,
            check=True,
        )
    (so,) = (tmp_path / "b" / "memd").glob("_ext*.so")
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('memd._ext', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(sorted(n for n in sys.argv[2:] if hasattr(m, n)), hasattr(m, 'heap_malloc'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, so, *TEST_HOOKS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.split() == ["[]", "True"], proc.stdout
