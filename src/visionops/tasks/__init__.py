"""The recognition tasks, keyed by params.yaml's `task`; each folder holds what differs for one task.

A task's `task` module exposes `TASK`, an object with the stage functions of `visionops.tasks.base.Task`.
The CLI asks the configured task for each stage and never branches on its name, so adding a task
(keypoints, say) means adding one folder here and its name to `TASKS` and `config.TaskName`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visionops.tasks.base import Task

TASKS = ("classification", "detection", "segmentation")


def get_task(name: str) -> Task:
    """The task named `name` (its package is imported only now)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"visionops.tasks.{name}.task").TASK
