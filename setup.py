"""Declares the C extension only; metadata lives in pyproject.toml."""

import glob
import os

from setuptools import Extension, setup

extra = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"]
if os.environ.get("MEMD_ASAN"):
    extra += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]

setup(
    ext_modules=[
        Extension(
            "memd._ext",
            sources=sorted(glob.glob("ext/*.c")),
            depends=sorted(glob.glob("ext/*.h")),
            include_dirs=["ext"],
            extra_compile_args=extra,
            extra_link_args=["-lpthread"] + (["-fsanitize=address"] if os.environ.get("MEMD_ASAN") else []),
        )
    ],
)
