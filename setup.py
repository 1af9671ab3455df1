"""The wheel carries the shipped prototxts and Python layers: ``build_py`` copies ``prototxt/``
and ``layers/`` into ``exdrop/_shipped/``, where :mod:`exdrop.paths` finds them outside a
checkout. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        shipped = Path(self.build_lib) / "exdrop" / "_shipped"
        for folder in ("prototxt", "layers"):
            target = shipped / folder
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(HERE / folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithShippedFiles})
