"""Builds the transport's compiled hot path (shm_protocol._hotpath, from the C
files in shm_protocol/hotpath_c/); the rest of the package metadata is in setup.cfg."""

import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILER_HINT = (
    "shm-embed needs a C compiler and the Python headers to build its hot path "
    "(shm_protocol/hotpath_c/). On Debian or Ubuntu: apt-get install gcc python3-dev; "
    "on Fedora or RHEL: dnf install gcc python3-devel. Then run the install again."
)


class BuildHotPath(build_ext):
    """build_ext that names the packages to install when the compiler or the headers are missing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils raises several types: CompileError, PlatformError, ...
            raise SystemExit(f"error: {exc}\n{COMPILER_HINT}") from exc

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise SystemExit(f"error: {exc}\n{COMPILER_HINT}") from exc


setup(
    ext_modules=[
        Extension(
            "shm_protocol._hotpath",
            sources=sorted(glob.glob("shm_protocol/hotpath_c/*.c")),
            depends=["shm_protocol/hotpath_c/hotpath.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ],
    cmdclass={"build_ext": BuildHotPath},
)
