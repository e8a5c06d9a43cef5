"""Sphinx configuration: `make docs` (HTML in docs/_build/html), warnings are errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout, with the extension built in place
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

from memd import __version__  # noqa: E402

project = "memd"
author = "the memd authors"
copyright = "the memd authors, BSD-3-Clause"
release = version = __version__

autodoc_docstring_signature = False  # C docstrings start with a usage line: keep it as text

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "memd_docs",  # every public name documented, with a docstring
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Public names without docstrings show up (and fail the build: memd_docs).
autodoc_default_options = {"members": True, "undoc-members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

nitpicky = True
# Names the reference mentions but does not document: Python's own (no intersphinx:
# the build needs no network) and memd's internals.
_BUILTINS = (
    "int|float|str|bytes|bool|None|object|dict|list|tuple|set|type|memoryview|Any|"
    "Callable|Iterator|Sequence|collections.abc.*|typing.*|threading.*|Exception|"
    "BaseException|ConnectionError|RuntimeError|PermissionError|ValueError|"
    "LookupError|MemoryError|KeyError|FileExistsError|OSError|TimeoutError|"
    "pathlib.Path|subprocess.*|signal.*|asyncio.*"
)
nitpick_ignore_regex = [
    ("py:class", rf"({_BUILTINS})"),
    ("py:exc", rf"({_BUILTINS})"),
    ("py:obj", rf"({_BUILTINS})"),
    ("py:class", r"memd\._ext\..*"),
    ("py:class", r"memd\.(shm|mp|hw|primary)\..*"),
    ("py:class", r"(_ext|ObjInit|Values|Buffer|MempoolMemChunk|Path|os\.PathLike.*)"),
    ("py:obj", r"memd\.shm\..*"),
]

html_theme = "furo"
html_title = f"memd {release}"
