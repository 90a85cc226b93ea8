"""Downstream tasks (SPEC §4): image-text retrieval, VQA, captioning and visual grounding.

One fine-tuning loop and one evaluation driver (``copa.tasks.finetune``) serve four small task
objects (``copa.tasks.base.Task``). Names are imported lazily so that ``import copa.tasks.cli``
(done by every ``copa`` command) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Task": "base",
    "TaskOptions": "base",
    "EvalResult": "base",
    "TASK_NAMES": "registry",
    "make_task": "registry",
    "finetune": "finetune",
    "run_evaluation": "finetune",
    "evaluate_checkpoint": "finetune",
    "prepare_model": "finetune",
    "RetrievalTask": "retrieval",
    "itm_scores_shared_prefix": "retrieval",
    "VQATask": "vqa",
    "CaptionTask": "caption",
    "GroundingTask": "grounding",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"copa.tasks.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'copa.tasks' has no attribute {name!r}")
