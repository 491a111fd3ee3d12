"""What a task contributes to a run: the type every task builder returns (`micro_diffusion.training.tasks.TASKS`).

In its own module so that the task modules (`tasks`, `autoencoder_task`) and `train.py` share it without
importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from composer.core import Callback
from composer.models import ComposerModel

from micro_diffusion.training.config import RunConfig


@dataclass
class TaskComponents:
    """What a task contributes to a run. eval_dataloader is None when the task has no evaluation data."""

    model: ComposerModel
    train_dataloader: Iterable
    eval_dataloader: Iterable | None = None
    callbacks: list[Callback] = field(default_factory=list)


TaskBuilder = Callable[[RunConfig], TaskComponents]
