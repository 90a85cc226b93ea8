"""Task names and the factory (plain function, no registry machinery). Importing this module is
cheap: the task modules load only when a task is made."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from copa.tasks.base import Task, TaskOptions

TASKS = {
    "retrieval": ("copa.tasks.retrieval", "RetrievalTask"),
    "vqa": ("copa.tasks.vqa", "VQATask"),
    "caption": ("copa.tasks.caption", "CaptionTask"),
    "grounding": ("copa.tasks.grounding", "GroundingTask"),
}
TASK_NAMES = tuple(TASKS)


def make_task(name: str, options: TaskOptions | None = None) -> Task:
    """The task called ``name`` (one of ``TASK_NAMES``) with ``options``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)(options)
