"""``lm-eval-regions``: lm-eval's own command line with ``hf-regions`` registered and our tasks
found without ``--include_path``.

Same arguments as ``lm_eval`` (it *is* ``lm_eval.__main__.cli_evaluate``); it works even where
the ``.pth`` import hook is absent (e.g. ``pip install --target``, ``PYTHONNOUSERSITE`` setups).
Our task folder (``lmeval_regions.tasks``) is indexed besides any ``--include_path`` unless
``LMEVAL_REGIONS_NO_TASKS=1``; with plain ``lm_eval`` pass it yourself:
``--include_path "$(lmeval-regions tasks-path)"``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmeval_regions.eval.tasks import tasks_path


def include_ours(include_path):
    """``include_path`` (None, a path or a list, as ``TaskManager`` takes it) plus our tasks."""
    ours = tasks_path()
    if include_path is None:
        return [ours]
    paths = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    return paths if any(Path(p).resolve() == ours.resolve() for p in paths) else paths + [ours]


def add_tasks_to_task_manager() -> None:
    """Make every ``TaskManager`` of this process index our tasks too (idempotent).

    lm-eval's ``--include_path`` takes one folder, so the user's own folder and ours cannot both
    be passed on the command line; wrapping the constructor keeps both."""
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    if getattr(init, "_lmeval_regions", False):
        return

    def __init__(self, *args, include_path=None, **kwargs):
        init(self, *args, include_path=include_path if os.environ.get("LMEVAL_REGIONS_NO_TASKS")
             else include_ours(include_path), **kwargs)

    __init__._lmeval_regions = True
    TaskManager.__init__ = __init__


def main() -> None:
    from lmeval_regions.eval.hook import register

    register()
    from lm_eval.__main__ import cli_evaluate

    add_tasks_to_task_manager()
    cli_evaluate()


if __name__ == "__main__":
    main()
