"""Every Python example in the docs runs, against a real daemon, in both modes.

Each ```python block of the pages in ``EXAMPLE_PAGES`` is a complete program: it is
written to a file and run in a fresh interpreter with ``MEMD_PREFIX`` and
``MEMD_RUNTIME_DIR`` pointing at a test daemon (the convention the quickstart
documents), and must exit 0 and leave nothing behind in the daemon.  Together they
must also pass ``mypy --strict``, so the docs teach typed code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memd.testing import Daemon

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE_PAGES = [
    DOCS / "quickstart.md",
    DOCS / "tutorials" / "numpy.md",
    DOCS / "tutorials" / "pipeline.md",
    DOCS / "tutorials" / "shared-memory.md",
    DOCS / "tutorials" / "asyncio.md",
    ROOT / "README.md",
]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return FENCE.findall(page.read_text())


def _examples() -> list[tuple[str, str]]:
    out = []
    for page in EXAMPLE_PAGES:
        for i, code in enumerate(python_blocks(page)):
            out.append((f"{page.relative_to(ROOT)}#{i + 1}", code))
    return out


EXAMPLES = _examples()


def test_every_example_page_has_examples() -> None:
    for page in EXAMPLE_PAGES:
        assert python_blocks(page), f"{page} has no ```python block"


def test_every_python_block_is_under_test() -> None:
    """A page outside EXAMPLE_PAGES must not hold Python examples: they would not run."""
    tested = set(EXAMPLE_PAGES)
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts or page in tested:
            continue
        assert not python_blocks(page), f"{page} has ```python blocks no test runs"


def test_docs_build_fails_on_a_missing_docstring(tmp_path: Path) -> None:
    """The docs extension (docs/_ext/memd_docs.py) turns an undocumented public name
    into a warning, which `make docs` (-W) makes an error."""
    pytest.importorskip("sphinx", reason="the docs extra (make docs) installs Sphinx")
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "fake_mod.py").write_text(
        '"""A module."""\n\ndef documented():\n    """Yes."""\n\ndef undocumented():\n    pass\n'
    )
    (src / "conf.py").write_text(
        f"import sys\nsys.path[:0] = [{str(tmp_path)!r}, {str(DOCS / '_ext')!r}]\n"
        "extensions = ['sphinx.ext.autodoc', 'memd_docs']\n"
        "autodoc_default_options = {'members': True, 'undoc-members': True}\n"
    )
    (src / "index.rst").write_text("Fake\n====\n\n.. automodule:: fake_mod\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-E", "-W", "-b", "html", src, tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode != 0
    assert "fake_mod.undocumented has no docstring" in proc.stderr, proc.stderr
    assert "fake_mod.documented has no" not in proc.stderr


def test_every_example_type_checks_strictly(tmp_path: Path) -> None:
    """Every example passes `mypy --strict`, as a user's program that imports the
    installed package would (memd's own modules are followed silently, as mypy does
    for an installed package): the docs show typed code (Ring[int], None checks)."""
    pytest.importorskip("mypy", reason="the dev extra installs mypy")
    files = []
    for i, (where, code) in enumerate(EXAMPLES):
        f = tmp_path / f"example_{i}_{re.sub(r'[^a-z0-9]+', '_', where.lower())}.py"
        f.write_text(code)
        files.append(f)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",  # memd's own code is checked by `make lint`
            "--config-file=",  # no project config: the user's defaults
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # this tree's memd, not an installed one
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"no issues found in {len(files)} source files" in proc.stdout, proc.stdout


def _objects(d: Daemon) -> dict[str, int]:
    """How many memzones, rings and mempools the daemon has (to see leftovers)."""
    code = (
        "import json, sys, memd_client as mc\n"
        "with mc.attach(sys.argv[1], runtime_dir=sys.argv[2]) as m:\n"
        "    print(json.dumps({'memzones': len(m.memzones()), 'rings': len(m.rings()),"
        " 'mempools': len(m.mempools())}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, d.prefix, str(d.runtime_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_runs(where: str, code: str, daemon: Daemon, tmp_path: Path) -> None:
    before = _objects(daemon)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {
        **os.environ,
        "MEMD_PREFIX": daemon.prefix,
        "MEMD_RUNTIME_DIR": str(daemon.runtime_dir),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert _objects(daemon) == before, f"{where} left objects behind"
    assert daemon.proc is not None and daemon.proc.poll() is None  # the daemon still serves
