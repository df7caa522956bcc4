"""lm-eval task suite of lmeval-regions (YAMLs + helpers); see docs/tasks.md.

Pass this folder to lm-eval as ``include_path`` (``lmeval_regions.task_paths.tasks_path()``,
or ``lm_eval --include_path "$(lmeval-regions tasks-path)"``).
"""
