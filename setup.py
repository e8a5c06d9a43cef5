"""Declares the C extension only; metadata lives in pyproject.toml."""

import glob
import os

from setuptools import Extension, setup

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
macros = [("MEMD_TEST_HOOKS", "1")] if os.environ.get("MEMD_TEST_HOOKS") else []
link = ["-lpthread"]
if os.environ.get("MEMD_ASAN"):
    extra += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
    link += ["-fsanitize=address"]

setup(
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
