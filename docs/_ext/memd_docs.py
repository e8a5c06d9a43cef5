"""Sphinx extension: the API reference covers every public name, each with a docstring.

Two checks, both warnings (so `sphinx-build -W` fails):

- every object autodoc documents has a docstring (``undoc-members`` is on, so an
  undocumented method or attribute is documented empty and caught here);
- every name in ``memd_client.__all__`` and ``memd.__all__``, and every public method
  and property of the classes in ``PUBLIC_CLASSES`` (what ``attach()`` hands out),
  is described somewhere in the reference.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

log = logging.getLogger("memd_docs")

# Packages whose __all__ is the public surface.
PUBLIC_MODULES = ("memd_client", "memd")
# Classes users get from memd_client without naming their module: their public
# members (methods, properties, C ones included) are part of the surface too.
PUBLIC_CLASSES = (
    "memd_client.Secondary",
    "memd_client.Memzone",
    "memd_client.Ring",
    "memd_client.Mempool",
    "memd_client.MempoolObject",
    "memd_client.Block",
)


def _resolve(dotted: str) -> Any:
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def public_names() -> list[str]:
    """Every public name the reference must describe, as documented (dotted)."""
    names: list[str] = []
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        names += [f"{modname}.{n}" for n in mod.__all__]
    for cls_name in PUBLIC_CLASSES:
        cls = _resolve(cls_name)
        for member, value in inspect.getmembers(cls):
            if member.startswith("_") or inspect.isclass(value):
                continue
            if not (callable(value) or inspect.isdatadescriptor(value)):
                continue  # class-level constants: described with their class
            names.append(f"{cls_name}.{member}")
    return sorted(set(names))


_stash: dict[str, list[str]] = {}
_warned: set[str] = set()  # said once, by whichever check saw it first

# The heap's C fast paths fall back to Python methods whose docstrings hold the
# behaviour and every error (memd.shm.heap.HeapMixin): the reference shows them there.
FALLBACK_DOCS = {"malloc": "_heap_alloc_py", "zmalloc": "_heap_alloc_py", "free": "_heap_free_py"}


def _fallback_docs(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    owner, _, member = name.rpartition(".")
    if what != "method" or member not in FALLBACK_DOCS:
        return
    fallback = getattr(_object(owner), FALLBACK_DOCS[member], None)
    if fallback is not None and fallback.__doc__:
        lines += ["", *inspect.cleandoc(fallback.__doc__).splitlines()]


def _keep_attribute_text(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    # Napoleon reads "IO address of the data: ..." on a property as "type: text";
    # memd's property docstrings are sentences, so they bypass it (restored below).
    if what in ("attribute", "property"):
        _stash[name] = list(lines)


def _restore_attribute_text(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if name in _stash:
        lines[:] = _stash.pop(name)


def _no_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if not any(line.strip() for line in lines):
        _warned.add(name)
        log.warning("%s %s has no docstring", what, name, type="memd_docs")


def _empty_description(app: Sphinx, domain: str, objtype: str, content: Any) -> None:
    # autodoc emits no docstring event for an attribute without one: catch any object
    # whose description came out empty instead
    if domain != "py" or content.astext().strip():
        return
    sig = content.parent[0] if len(content.parent) else None
    ids = sig.get("ids") if sig is not None else None
    name = ids[0] if ids else content.parent.astext().split("\n", 1)[0]
    if name in _warned:
        return
    log.warning("%s %s has no docstring", objtype, name, type="memd_docs", location=content)


def _object(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _check_coverage(app: Sphinx, env: Any) -> None:
    documented = set(env.domains["py"].objects)
    # memd.MemdError is memd_client.MemdError: a class or function documented under
    # one public name counts for the others
    same = {id(o) for o in map(_object, documented) if inspect.isclass(o) or inspect.isroutine(o)}
    for name in public_names():
        obj = _object(name)
        named = inspect.isclass(obj) or inspect.isroutine(obj)
        if name in documented or (named and id(obj) in same):
            continue
        log.warning("public name %s is not in the API reference", name, type="memd_docs")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _fallback_docs, priority=300)
    app.connect("autodoc-process-docstring", _keep_attribute_text, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_text, priority=600)
    app.connect("autodoc-process-docstring", _no_docstring, priority=700)
    app.connect("object-description-transform", _empty_description)
    app.connect("env-check-consistency", _check_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
