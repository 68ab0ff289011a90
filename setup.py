"""Builds ``streams/core.py`` with mypyc (a C extension beside the source).

``LEDGER_PURE=1 pip install .`` skips it, and so does a machine without a C
compiler: the same source then runs interpreted (``streams.core.COMPILED`` says
which, and the worker logs it).
"""

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED_MODULES = ["streams/core.py"]


class OptionalBuildExt(build_ext):
    """A failed compile leaves the interpreted source in place, with a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: run the source instead
            print(f"WARNING: streams.core not compiled ({exc}); it will run interpreted")


ext_modules = []
if not os.environ.get("LEDGER_PURE"):
    from mypyc.build import mypycify

    # no config file: the project's mypy settings load the pydantic plugin, absent here
    ext_modules = mypycify(["--config-file=", "--strict", *COMPILED_MODULES], opt_level="3")

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
