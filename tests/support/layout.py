"""The shared layout as tests poke it: offsets from the extension, never copied."""

from __future__ import annotations

from memd import _ext


def offsets() -> dict[str, int]:
    """`_ext.LAYOUT` with each "type.field" as its offset and each "type" as its size."""
    return {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
