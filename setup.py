"""Declares the C extension only; metadata lives in pyproject.toml."""

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

extra = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wconversion",
    "-Werror",
    "-Wno-missing-field-initializers",
]
# Test builds (`make ext`, so `make test` and CI) add the crash points and offset-level
# calls the tests drive; a wheel (`pip install .`) has none of them.
hooks = os.environ.get("MEMD_TEST_HOOKS", "0") not in ("", "0")
asan = os.environ.get("MEMD_ASAN", "0") not in ("", "0")
macros = [("MEMD_TEST_HOOKS", "1")] if hooks else []
link = ["-lpthread"]
if asan:
    extra += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
    link += ["-fsanitize=address"]


class BuildExt(build_ext):
    """Always compile afresh: setuptools reuses objects and the built module by
    timestamp alone, so a wheel would otherwise ship a test build (MEMD_TEST_HOOKS)
    or an ASan build, and a test build could keep a wheel's.  A build takes seconds."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.force = True


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "memd._ext",
            sources=sorted(glob.glob("ext/*.c")),
            depends=sorted(glob.glob("ext/*.h")),
            include_dirs=["ext"],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ],
)
