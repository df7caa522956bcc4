"""Build step that installs ``lmeval_regions_lm_eval.pth`` into site-packages.

Declared in ``pyproject.toml`` as ``[tool.setuptools.cmdclass] build_py``. A ``.pth`` must sit
at the top of site-packages, which package data cannot reach; so ``build_py`` writes it:

* ``pip install .`` (wheel): into the root of ``build_lib``, i.e. of the wheel's purelib;
* ``pip install -e .`` (PEP 660 editable wheel): setuptools ignores ``build_lib`` there, and
  ``install_lib`` points at the root of the unpacked editable wheel, so it is written there.

Its single line runs :func:`lmeval_regions.eval.hook.install` and swallows every error,
so a broken or half-removed install can never stop Python from starting.
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

PTH_NAME = "lmeval_regions_lm_eval.pth"
PTH_LINE = ("import sys; exec('try:\\n import lmeval_regions.eval.hook as _h; _h.install()"
            "\\nexcept Exception:\\n pass')\n")


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            root = Path(self.get_finalized_command("install").install_lib)
        else:
            root = Path(self.build_lib)
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]
