"""The task registry: built-ins plus the ``medfed.tasks`` entry point group."""

from __future__ import annotations

from medfed.core.registry import Registry
from medfed.tasks.base import Task

TASKS: Registry[Task] = Registry("task", plural="tasks", entry_point_group="medfed.tasks")


def _register_builtins() -> None:
    from medfed.tasks.brain_lesion_cls import TASK as brain_lesion_cls
    from medfed.tasks.brain_tissue_seg import TASK as brain_tissue_seg
    from medfed.tasks.brain_tissue_seg import TASK_WIDE as brain_tissue_seg_wide
    from medfed.tasks.brain_tissue_seg_3d import TASK as brain_tissue_seg_3d
    from medfed.tasks.tiny_seg import TASK as tiny_seg
    from medfed.tasks.tiny_seg import TASK_1M as tiny_seg_1m
    from medfed.tasks.tiny_seg import TASK_10M as tiny_seg_10m
    from medfed.tasks.tiny_seg import TASK_50M as tiny_seg_50m

    for task in (
        tiny_seg,
        brain_tissue_seg,
        brain_tissue_seg_wide,
        brain_tissue_seg_3d,
        brain_lesion_cls,
        tiny_seg_1m,
        tiny_seg_10m,
        tiny_seg_50m,
    ):
        TASKS.register(task.name, task)


_register_builtins()


def get_task(name: str) -> Task:
    """Return the task registered as ``name`` ('did you mean' on a typo)."""
    return TASKS.get(name)
