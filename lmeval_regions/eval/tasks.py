"""Where the installed lm-eval task suite lives.

``tasks/`` at the repository root is installed as the package ``lmeval_regions.tasks``; its
folder is what lm-eval needs as ``include_path``::

    lm_eval --include_path "$(lmeval-regions tasks-path)" --tasks udhr_ppl ...
    TaskManager(include_path=tasks_path())
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmeval_regions.errors import RegionsError


def tasks_path() -> Path:
    """The folder holding the task YAMLs (``lmeval_regions.tasks``)."""
    spec = importlib.util.find_spec("lmeval_regions.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise RegionsError("the package 'lmeval_regions.tasks' is not installed; reinstall "
                           "lmeval-regions (`pip install -e .`)")
    return Path(list(spec.submodule_search_locations)[0])


def task_manager(**kwargs):
    """An lm-eval ``TaskManager`` that also indexes our tasks (extra kwargs passed on)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_path()), **kwargs)
