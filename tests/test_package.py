"""The package's public surface and the rule between its halves."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TEST_HOOKS = (
    "heap_realloc",
    "heap_block_size",
    "_heap_crash_after",
    "_ring_crash_after",
    "_ring_stop_after",
    "_mempool_settle_own",
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


def test_every_extension_callable_has_the_stubs_signature() -> None:
    """inspect.signature works on every C function and method (setup.py puts the
    stub's text signature in each docstring), with the stub's parameter names; the
    test hooks' come from their own stub, ext/test_hooks.pyi, which no wheel ships."""
    import ast
    import inspect

    from memd import _ext

    root = Path(__file__).resolve().parent.parent
    body = ast.parse((Path(_ext.__file__).parent / "_ext.pyi").read_text()).body
    hooks = ast.parse((root / "ext" / "test_hooks.pyi").read_text()).body
    assert {n.name for n in hooks if isinstance(n, ast.FunctionDef)} == set(TEST_HOOKS)
    stub: dict[str, list[str]] = {}

    def names(fn: ast.FunctionDef, method: bool) -> list[str]:
        a = fn.args
        params = [p.arg for p in [*a.posonlyargs, *a.args]][1 if method else 0 :]
        return params + [p.arg for p in a.kwonlyargs]

    for node in [*body, *hooks]:
        if isinstance(node, ast.FunctionDef):
            stub.setdefault(node.name, names(node, False))
        elif isinstance(node, ast.ClassDef):
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("__"):
                    stub.setdefault(f"{node.name}.{fn.name}", names(fn, True))
    checked: set[str] = set()
    for name in dir(_ext):
        obj = getattr(_ext, name)
        if name.startswith("__"):
            continue
        members = [(name, obj)] if not isinstance(obj, type) else []
        if isinstance(obj, type):
            members = [
                (f"{name}.{m}", getattr(obj, m))
                for m in vars(obj)
                if not m.startswith("__") and callable(getattr(obj, m))
            ]
        for key, fn in members:
            if not callable(fn) or isinstance(fn, type):
                continue
            bound = getattr(fn, "__self__", None) is not None  # a classmethod
            params = list(inspect.signature(fn).parameters)
            if not bound and "." in key:
                params = params[1:]  # self
            assert params == stub[key], key
            checked.add(key)
    assert len(checked) > 90
    assert checked >= set(TEST_HOOKS)  # a test build: the hooks have theirs too


def test_stubgen_reads_every_extension_docstring(tmp_path: Path) -> None:
    """mypy's stubgen takes "name(args) -> type: text" and a property's "type: text"
    from docstrings: every one of the extension's must parse, or stubgen aborts."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("mypy.stubgen") is None:
        pytest.skip("mypy's stubgen is not installed")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mypy.stubgen import main; main(sys.argv[1:])",  # mypyc: no -m
            *("-m", "memd._ext", "-o", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "class Ring" in (tmp_path / "memd" / "_ext.pyi").read_text()


def test_the_extension_stub_names_exactly_what_the_extension_has() -> None:
    """memd/_ext.pyi is the one written signature of each C call: it must name every
    public function, class and constant of memd._ext, and nothing else."""
    import ast

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


ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, Any]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_one_version_everywhere() -> None:
    """The version is written once (pyproject.toml); the packages, both commands and
    the admin socket's greeting all say it."""
    import memd
    import memd_client
    from memd.admin import api
    from memd.testing import run_memctl, run_memd

    version = _pyproject()["version"]
    assert memd.__version__ == memd_client.__version__ == version
    assert f"memd {version}" == api.VERSION
    proc = run_memd("--version")
    assert (proc.returncode, proc.stdout) == (0, f"memd {version}\n"), proc.stderr
    proc = run_memctl("--version")
    assert (proc.returncode, proc.stdout) == (0, f"memctl (memd) {version}\n"), proc.stderr


def test_version_of_an_installed_memd_comes_from_its_metadata(tmp_path: Path) -> None:
    """Installed (no pyproject.toml beside the package, or another project's), the
    version is the package metadata's; without either, 0+unknown."""
    import importlib.metadata

    from memd import _version

    (tmp_path / "memd").mkdir()
    try:
        installed = importlib.metadata.version("memd")
    except importlib.metadata.PackageNotFoundError:
        installed = _version.UNKNOWN
    assert _version.find_version(tmp_path / "memd") == installed
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "9.9"\n')
    assert _version.find_version(tmp_path / "memd") == installed
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "memd"\nversion = "7.1.2"\n')
    assert _version.find_version(tmp_path / "memd") == "7.1.2"


def test_memd_client_exports_every_exception() -> None:
    """Every public exception of memd.errors (and UnsafePath, which attach raises) is
    importable from memd_client and named in its __all__; memd exports them too."""
    import inspect

    import memd
    import memd_client
    from memd import errors

    public = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }
    assert {"MemdExistsError", "MemdKeyError", "MemdMemoryError", "MemdValueError"} <= public
    for name in public:
        assert getattr(memd_client, name) is getattr(errors, name), name
        assert getattr(memd, name) is getattr(errors, name), name
    assert public | {"UnsafePath"} <= set(memd_client.__all__)
    assert public <= set(memd.__all__)
    assert issubclass(memd_client.UnsafePath, memd_client.PermissionDenied)
    assert all(hasattr(memd_client, n) for n in memd_client.__all__)


def test_license_is_the_one_pyproject_names() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert _pyproject()["license"] == {"text": "BSD-3-Clause"}
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, the memd authors" in text


def _built_so(lib: Path) -> bytes:
    (so,) = lib.glob("**/memd/_ext*.so")
    return so.read_bytes()


def test_a_wheel_ships_neither_asan_nor_test_build_and_has_its_markers(tmp_path: Path) -> None:
    """`pip install .` right after `make asan`: the wheel's extension is compiled
    afresh, without ASan, whatever build sits in place; py.typed (both packages) and
    the extension's stub ship with it.  `setup.py build` makes exactly what
    bdist_wheel packs (the wheel's files are its build/lib)."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.so", "__pycache__", ".*_cache", "*.egg-info"
        ),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MEMD_TEST_HOOKS", "MEMD_ASAN")}

    def setup(*args: str, **extra: str) -> None:
        subprocess.run(
            [sys.executable, "setup.py", "-q", *args],
            cwd=src,
            env=env | extra,
            capture_output=True,
            timeout=600,
            check=True,
        )

    # what `make asan` leaves: an ASan build of the extension, in place
    setup("build_ext", "--inplace", "-t", "build/asan", MEMD_ASAN="1", MEMD_TEST_HOOKS="1")
    (in_place,) = (src / "memd").glob("_ext*.so")
    assert b"__asan_init" in in_place.read_bytes()
    setup("build", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp"))
    (lib,) = (tmp_path / "lib").glob("lib*")
    assert b"__asan_init" not in _built_so(lib)
    for shipped in ("memd/py.typed", "memd_client/py.typed", "memd/_ext.pyi"):
        assert (lib / shipped).is_file(), shipped
    # and it loads without the ASan runtime, with no test hooks
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('memd._ext', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(sorted(n for n in sys.argv[2:] if hasattr(m, n)))"
    )
    (so,) = lib.glob("memd/_ext*.so")
    proc = subprocess.run(
        [sys.executable, "-c", code, so, *TEST_HOOKS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_make_run_installs_only_the_daemon_and_passes_args(tmp_path: Path) -> None:
    """`make run` installs the project without the test and bench extras (test,
    lint and bench add theirs, each with its own stamp) and hands ARGS to memd; the
    README's two first commands are make targets."""
    if shutil.which("make") is None:
        raise AssertionError("make is needed (README's first commands)")

    def recipe(*goals: str) -> str:
        proc = subprocess.run(
            ["make", "-n", "-B", "-C", ROOT, f"VENV={tmp_path}/venv", *goals],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return proc.stdout

    run = recipe("run", "ARGS=--runtime-dir /x --huge-dir /y")
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert installs and all("[" not in line for line in installs), installs
    assert "install -q -e .\n" in run
    memd_lines = [line for line in run.splitlines() if "/bin/memd " in line]
    assert len(memd_lines) == 2  # with hugepages, and --no-huge
    assert all(
        line.rstrip("; \\").endswith("--runtime-dir /x --huge-dir /y") for line in memd_lines
    )
    for goal, extra in (("test", "test"), ("lint", "test"), ("bench", "bench"), ("docs", "docs")):
        assert f"-e '.[{extra}]'" in recipe(goal), goal
    # the docs extra reinstalls the extension without test hooks: the stamp goes, and
    # the docs are built from a fresh test build, warnings as errors
    docs = recipe("docs")
    assert "rm -f memd/.ext-built" in docs
    assert docs.index("-e '.[docs]'") < docs.index("build_ext --inplace") < docs.index("-W")
    # setup.py build_ext runs in the venv: it gets the build requires (3.12 has no
    # setuptools of its own), as pyproject names them
    if sys.version_info >= (3, 11):
        import tomllib

        with open(ROOT / "pyproject.toml", "rb") as f:
            requires = tomllib.load(f)["build-system"]["requires"]
        pip = next(line for line in run.splitlines() if "install -q --upgrade pip" in line)
        assert shlex.split(pip.split("--upgrade pip", 1)[1]) == requires
        assert run.index("--upgrade pip") < run.index("install -q -e .")
    readme = (ROOT / "README.md").read_text()
    first = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make run", "make test"]


def test_nothing_refers_outside_the_repository() -> None:
    """A clone is self-contained: no file points at a sibling `shared` folder (the API
    reference is docs/, built by `make docs`)."""
    outside = ("../" + "shared", "shared/" + "API", "/work/" + "shared")
    files = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert files
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        hits += [f"{name}: {ref}" for ref in outside if ref in text]
    assert not hits, hits
