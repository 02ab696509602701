"""setuptools puts no ``.pth`` file into a wheel by itself: copy it next to the module."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "roma_vllm_cpu_alias.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
