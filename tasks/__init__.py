"""Tasks: what a site trains (data spec, transforms, model, loss, metrics, defaults).

A task knows nothing of Flower; it imports only the core. Tasks are looked up
by name in :data:`medfed.tasks.registry.TASKS`.
"""

from medfed.tasks.base import Hyperparameters, SiteData, Task
from medfed.tasks.registry import TASKS, get_task

__all__ = ["TASKS", "Hyperparameters", "SiteData", "Task", "get_task"]
