"""memd's version, from its one source: ``version`` in pyproject.toml.

An installed memd reads it from its package metadata (which pip wrote from
pyproject.toml); a source checkout run in place (``PYTHONPATH=checkout``) reads the
pyproject.toml beside the package, since that is the code running, even when an older
install's metadata is also on the path.  Neither: ``0+unknown``."""

from __future__ import annotations

from pathlib import Path

UNKNOWN = "0+unknown"


def find_version(package_dir: Path | None = None) -> str:
    """The version of the memd whose package lives in `package_dir` (default: this one)."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    try:
        import tomllib  # 3.11+; on 3.10 a checkout reports its installed metadata

        with open(root / "pyproject.toml", "rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "memd" and isinstance(project.get("version"), str):
            return str(project["version"])
    except (ImportError, OSError, ValueError):
        pass  # not a checkout (an installed wheel has no pyproject.toml beside it)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("memd")
    except PackageNotFoundError:
        return UNKNOWN


__version__ = find_version()
